"""vlmforge: build, train, convert and run vision-language models as the Idefics2 paper found to work.

Importing the package registers its configs and models with transformers' Auto classes.
"""

from vlmforge.auto import AutoModelForVision2Seq, register_auto_classes
from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.modeling.configuration_connector import ConnectorConfig
from vlmforge.modeling.configuration_cross_attention_vlm import CrossAttentionVLMConfig
from vlmforge.modeling.configuration_vision_encoder import VisionEncoderConfig
from vlmforge.modeling.modeling_autoregressive_vlm import (
    AutoregressiveVLMForConditionalGeneration,
    AutoregressiveVLMModel,
    ImageFeaturesOutput,
)
from vlmforge.modeling.modeling_cross_attention_vlm import (
    CrossAttentionVLMForConditionalGeneration,
    CrossAttentionVLMModel,
    ImageKeyValues,
)
from vlmforge.modeling.modeling_vision_encoder import VisionEncoder
from vlmforge.modeling.parameter_breakdown import ParameterBreakdown, parameter_breakdown
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import VLMProcessor

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "AutoModelForVision2Seq",
    "AutoregressiveVLMConfig",
    "AutoregressiveVLMForConditionalGeneration",
    "AutoregressiveVLMModel",
    "ConnectorConfig",
    "CrossAttentionVLMConfig",
    "CrossAttentionVLMForConditionalGeneration",
    "CrossAttentionVLMModel",
    "ImageFeaturesOutput",
    "ImageKeyValues",
    "ParameterBreakdown",
    "VisionEncoder",
    "VisionEncoderConfig",
    "VLMImageProcessor",
    "VLMProcessor",
    "parameter_breakdown",
]
