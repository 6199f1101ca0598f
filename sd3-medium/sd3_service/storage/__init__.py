"""Where images and request records are kept: a bucket or a folder, the spool for what it cannot take now."""
