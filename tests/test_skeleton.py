import cxr


def test_classes_are_the_three_calls():
    assert cxr.CLASSES == ("COVID", "NORMAL", "VIRAL")
