"""Teacher -> hybrid surgery and Mamba-in-Llama initialisation."""

from pipeline.convert.hybridize import (
    SUPPORTED,
    TEACHER_CLASSES,
    ConversionError,
    check_teacher,
    hybrid_config_from_teacher,
    hybridize,
    initialise_fresh,
    mamba_trial,
    mixer_generator,
)

__all__ = ["SUPPORTED", "TEACHER_CLASSES", "ConversionError", "check_teacher", "hybrid_config_from_teacher", "hybridize",
           "initialise_fresh", "mamba_trial", "mixer_generator"]
