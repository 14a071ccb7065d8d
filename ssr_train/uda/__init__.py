"""UDA building blocks shared by the DACS/DAFormer/MIC/SSR methods.

The blocks take every hyper-parameter as a keyword argument without a default: the defaults live once,
in the config dataclass of the method that uses them (methods/daformer.py ``DAFormerConfig``,
methods/mic.py ``MICConfig``)."""

REFERENCE_CROP = 512  # the reference's crop side, at which its pixel counts (RCS, ignored rows, MIC blocks) apply
