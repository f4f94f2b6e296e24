"""Adapters for training frameworks, each importing its framework lazily.

``import sparsetorch`` never imports this package; import the module of your
framework: ``sparsetorch.integrations.lightning`` (a Lightning ``Callback``) or
``sparsetorch.integrations.transformers`` (a Hugging Face ``TrainerCallback``).
"""
