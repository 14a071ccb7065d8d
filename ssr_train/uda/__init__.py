"""UDA building blocks shared by the DACS/DAFormer/MIC/SSR methods."""
