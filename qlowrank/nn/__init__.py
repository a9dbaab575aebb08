"""Layers: the bitsandbytes boundary, LoraLinear (and DoRA), LoftQ / PiSSA init, the chunked loss."""
