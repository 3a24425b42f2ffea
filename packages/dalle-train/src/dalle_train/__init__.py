"""dalle-train: config-driven, resumable training of dalle image tokenizers and transformers.

Entry points: :func:`dalle_train.run.run_training` with :func:`dalle_train.run_config.load_run_config` (what
``dalle train`` runs), :func:`dalle_train.loop.train_loop` (the shared loop), :mod:`dalle_train.backends`, and the
single-stage helpers :func:`dalle_train.vae_trainer.train_vae` and :func:`dalle_train.dalle_trainer.train_dalle`.
"""
