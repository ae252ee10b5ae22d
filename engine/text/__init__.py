"""The text front end: the Step chat format (rendering with `templates/`, parsing reasoning, content and
tool calls), the tokenizer, and image preprocessing with its crop plan and image-token layout.

Turns OpenAI-style messages and PIL images into the ids and pixel tensors `advisor.engine.model` takes, and the
model's text back into messages. Nothing is imported at package import: `chat`, `chat_parse` and
`image_plan` do not import torch (`advisor.tools.profiles` prices images through `image_plan`).
"""
