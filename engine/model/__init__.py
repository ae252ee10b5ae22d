"""The Step 3.7 Flash model: config, checkpoint loading, the layers (attention, MoE, norms, RoPE, the
projections' weight layouts), the KV cache, the vision tower, sampling, and the compiled CPU decode ops
(`cpu_decode`, source in `csrc/`). Token ids and pixel tensors in, logits out: nothing here knows the chat
format (that is `advisor.engine.text`).

Nothing is imported at package import, so `advisor.engine.model.config` stays light.
"""
