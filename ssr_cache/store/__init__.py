"""The Zarr feature store: layout and codecs, reading and writing, info and verify."""
