"""Framework integrations.

`trtllm_sawint4.integrations.transformers` (imported explicitly; it needs `transformers`): the
`SawInt4Cache` transformers Cache backed by `PagedKVCache`, and the `sawint4_paged` attention
implementation registered with `transformers.AttentionInterface`.
"""
