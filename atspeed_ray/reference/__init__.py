"""Reference recommenders: item transitions and SASRec, reported beside popularity.

These are *reference methods*, not the product: they tell a user whether a generative target
recommends well, under exactly the target's protocol (the same prompts, the same train sequences,
the same canonical item ids; see ``data.reference_rankings``).

* ``config``     the settings (torch-free, so that the CLI's ``--help`` stays fast)
* ``data``       prepared data -> canonical train sequences and histories; the rankings for evaluate
* ``transition`` item-to-item transitions of the train sequences, with a popularity back-off
* ``sasrec``     SASRec (Kang & McAuley 2018), a small causal self-attention model over item ids
"""
