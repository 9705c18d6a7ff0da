"""Results for other tools: label tables, DICOM SEG and SR, the research export."""


class ExportError(ValueError):
    """An export that cannot be written as asked; the message names the file and the fix."""
