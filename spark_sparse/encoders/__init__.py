"""timm models mirrored for any engine: the family structures, one leaf conversion per engine, the registry."""
