"""Teacher -> hybrid surgery: Mamba-in-Llama initialisation, and Gated DeltaNet initialised from attention."""

from pipeline.convert.hybridize import (
    GDN_OPTIONS,
    SUPPORTED,
    TEACHER_CLASSES,
    ConversionError,
    check_teacher,
    gdn_from_attention,
    gdn_trial,
    hybrid_config_from_teacher,
    hybridize,
    initialise_fresh,
    mamba_trial,
    mixer_generator,
)

__all__ = ["GDN_OPTIONS", "SUPPORTED", "TEACHER_CLASSES", "ConversionError", "check_teacher", "gdn_from_attention",
           "gdn_trial", "hybrid_config_from_teacher", "hybridize", "initialise_fresh", "mamba_trial", "mixer_generator"]
