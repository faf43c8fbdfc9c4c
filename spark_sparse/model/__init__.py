"""The SparK model: densify, the light decoder, the masked patch loss, and the module tying them to an encoder."""
