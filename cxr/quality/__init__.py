"""Test material: inputs nobody planned for (damaged, mutated, hostile files), DICOM files, out-of-scope pictures."""
