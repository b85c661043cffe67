"""Pruning a float conv network, module in and module out: ``transform.prune_module`` is the entry; ``config``
(torch-free) says what to do, ``layers`` which convs, ``magnitude`` / ``channel`` how, ``distill`` how to
recover, ``report`` (torch-free) what was done."""
