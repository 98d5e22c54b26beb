"""Teacher -> hybrid surgery and Mamba-in-Llama initialisation."""

from pipeline.convert.hybridize import (
    SUPPORTED,
    TEACHER_CLASSES,
    ConversionError,
    check_teacher,
    hybrid_config_from_teacher,
    hybridize,
    mamba_trial,
)

__all__ = ["SUPPORTED", "TEACHER_CLASSES", "ConversionError", "check_teacher", "hybrid_config_from_teacher", "hybridize",
           "mamba_trial"]
