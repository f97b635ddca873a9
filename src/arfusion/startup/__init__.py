"""Not imported: the folder put on PYTHONPATH for the flashinfer.comm opt-in."""
