"""Results for other tools: label tables, DICOM SEG and SR, the research export."""
