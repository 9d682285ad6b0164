"""Auto-class registration, and `AutoModelForVision2Seq` for the transformers 5 world.

`register_auto_classes()` runs on `import vlmforge`; after it, AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoImageProcessor and AutoProcessor resolve our model types like any built-in one.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.modeling.configuration_connector import ConnectorConfig
from vlmforge.modeling.configuration_cross_attention_vlm import CrossAttentionVLMConfig
from vlmforge.modeling.configuration_vision_encoder import VisionEncoderConfig
from vlmforge.modeling.modeling_autoregressive_vlm import (
    AutoregressiveVLMForConditionalGeneration,
    AutoregressiveVLMModel,
)
from vlmforge.modeling.modeling_connector import Connector
from vlmforge.modeling.modeling_cross_attention_vlm import (
    CrossAttentionVLMForConditionalGeneration,
    CrossAttentionVLMModel,
)
from vlmforge.modeling.modeling_vision_encoder import VisionEncoder
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import VLMProcessor


class AutoModelForVision2Seq(AutoModelForImageTextToText):
    """transformers 4's `AutoModelForVision2Seq`, which transformers 5 removed.

    It shares AutoModelForImageTextToText's registry, where `import vlmforge` puts our models: a vlmforge
    checkpoint loads as ours, and any other image-text-to-text checkpoint (Idefics2, LLaVA, ...) loads
    exactly as `AutoModelForImageTextToText.from_pretrained` would load it.
    """


def register_auto_classes() -> None:
    """Register our configs, models and processors with transformers' Auto classes (idempotent)."""
    for config_class in (VisionEncoderConfig, ConnectorConfig, AutoregressiveVLMConfig, CrossAttentionVLMConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(VisionEncoderConfig, VisionEncoder, exist_ok=True)
    AutoModel.register(ConnectorConfig, Connector, exist_ok=True)
    AutoModel.register(AutoregressiveVLMConfig, AutoregressiveVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        AutoregressiveVLMConfig, AutoregressiveVLMForConditionalGeneration, exist_ok=True
    )
    AutoModel.register(CrossAttentionVLMConfig, CrossAttentionVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        CrossAttentionVLMConfig, CrossAttentionVLMForConditionalGeneration, exist_ok=True
    )
    # VLMImageProcessor is a PIL-backend image processor: AutoImageProcessor falls back to it whichever
    # backend is asked for, since it is the only one registered
    AutoImageProcessor.register(
        AutoregressiveVLMConfig, image_processor_classes={"pil": VLMImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(AutoregressiveVLMConfig, VLMProcessor, exist_ok=True)
    # one processor class for both fusions: the config's model_type picks the prompt form
    AutoImageProcessor.register(
        CrossAttentionVLMConfig, image_processor_classes={"pil": VLMImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(CrossAttentionVLMConfig, VLMProcessor, exist_ok=True)
