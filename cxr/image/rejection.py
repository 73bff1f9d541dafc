"""One exception type for every reason an input file cannot become a training image.

The Spark jobs turn it into a row of the `errors` output, so the message must make sense to a person
who never reads the code: say what is wrong with the file, not which function failed.
"""


class RejectedImage(Exception):
    """A file that is not (or not a usable) chest X-ray image.

    stage: where it was caught: "read", "sniff", "header", "decode", "validate" or "enhance".
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
