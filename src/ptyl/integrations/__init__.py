"""Use ptyl inside the training loop you already have: PyTorch Lightning callbacks
(:mod:`ptyl.integrations.lightning`), the Hugging Face ``Trainer`` (:mod:`ptyl.integrations.huggingface`), or a
plain loop (five lines, ``docs/integrations.md``); :mod:`ptyl.integrations.common` holds what they share. Each adds
the same prior term as :func:`ptyl.training.fit`,

    U(theta) = mean_batch loss  +  -log p(theta) / N          (N: the global number of training examples)

so with the same seed, data order and optimizer the parameters equal ``fit``'s (the tests check it), and each can
collect SWAG on the source side and write the prior file. The frameworks are optional extras
(``pip install 'ptyl[lightning]'``, ``'ptyl[hf]'``) imported only when you use them.
"""

__all__ = ["common", "huggingface", "lightning"]
