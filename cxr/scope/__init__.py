"""What a model may be asked about: DICOM header columns, the scope rules, the out-of-distribution reference."""
