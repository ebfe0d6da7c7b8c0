"""Errors gradviz raises on purpose, each one line that names the problem and the fix.

    GradvizError                 base: catch this to catch everything below
    ├── RecordingError           the recorder cannot watch this model or loop as asked
    └── FileFormatError          a training_output.json that cannot be read
        └── UnknownVersionError  written by a newer gradviz (or not by gradviz at all)

Scripts print ``str(error)`` on one line and exit with code 2; they never show a traceback
for these.
"""

from __future__ import annotations


class GradvizError(Exception):
    """Base class of every error gradviz raises on purpose."""


class RecordingError(GradvizError):
    """The recorder cannot watch this model or training loop as asked."""


class FileFormatError(GradvizError):
    """A gradient-flow file is missing, unreadable, or not in the expected shape."""


class UnknownVersionError(FileFormatError):
    """The file's format version is newer than this gradviz understands."""
