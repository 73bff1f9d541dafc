"""cxr.common.markdown.replace_section: each benchmark script owns one section of BENCHMARKS.md."""
from cxr.common.markdown import replace_section


def test_a_section_is_replaced_in_place_and_others_are_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    replace_section(path, "## A", "## A\n\nfirst\n")
    replace_section(path, "## B", "## B\n\nother\n")
    replace_section(path, "## A", "## A\n\nsecond\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n") and "first" not in text
    assert text.index("## A") < text.index("second") < text.index("## B") < text.index("other")
    replace_section(path, "## A", "## A\n\nsecond\n")
    assert path.read_text() == text   # idempotent
