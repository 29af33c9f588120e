"""The digits demo, apart from the library: `nitrokernels demo` and the world it runs in.

    nitrokernels.digits.data    scikit-learn's 8x8 digits at 16x16, the digits UNet / encoder / classifier, the
                                pretrained assets (assets/: teacher, student, classifier) and the metrics
    nitrokernels.digits.demo    the `nitrokernels demo` command: distil the digits teacher with NitroDistiller

The NitroFusion API itself (discriminator, distiller, scheduler, sampling, pipeline) is nitrokernels.nitro; the
old paths nitrokernels.nitro.digits / nitrokernels.nitro.demo still import these modules, with a DeprecationWarning.
"""
