"""Built-in reuse policies, one module each (``cf_topk_index``: cf-topk's neighbour index).

:mod:`memshare.registry` names them; its names are the ``--policy`` choices.
"""
