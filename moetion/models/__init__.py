"""Built-in models expressed as layer lists for PipelineModule."""
from moetion.models.gpt_moe import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss

__all__ = ["GPTMoEConfig", "build_gpt_moe_layers", "gpt_moe_loss"]
