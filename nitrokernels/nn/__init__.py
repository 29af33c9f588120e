"""Drop-in nn.Modules built on nitrokernels.ops (same constructor signatures as torch / diffusers)."""
