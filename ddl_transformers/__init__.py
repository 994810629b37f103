"""Deep Delta Learning for Hugging Face Transformers.

Importing the package registers `DDLConfig`, `DDLModel` and `DDLForCausalLM` with the Auto classes, and marks them
for `save_pretrained` to write `auto_map` and copy the code, so saved folders load with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ddl import DDLConfig
from .delta_ops import delta_update, write_only_update
from .modeling_ddl import DDLForCausalLM, DDLModel, DDLPreTrainedModel
from .presets import PRESETS, SIZES, preset_config

AutoConfig.register(DDLConfig.model_type, DDLConfig, exist_ok=True)
AutoModel.register(DDLConfig, DDLModel, exist_ok=True)
AutoModelForCausalLM.register(DDLConfig, DDLForCausalLM, exist_ok=True)
DDLConfig.register_for_auto_class()
DDLModel.register_for_auto_class("AutoModel")
DDLForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SIZES",
    "DDLConfig",
    "DDLForCausalLM",
    "DDLModel",
    "DDLPreTrainedModel",
    "delta_update",
    "preset_config",
    "write_only_update",
]
