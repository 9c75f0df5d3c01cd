"""FAKE tensorrt_llm._torch.auto_deploy.custom_ops.attention (tests only)."""
