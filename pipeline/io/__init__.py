"""Reading the input: DICOM scan, series selection, frames, conversion, NIfTI sheets,
file helpers."""
