"""timm models mirrored for any engine: what a family is and the leaves families share, the encoder base,
one leaf conversion per engine, the registry; one module per timm family in ``families/``."""
