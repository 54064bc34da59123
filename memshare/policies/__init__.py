"""Built-in reuse policies. Each module holds one policy; :mod:`memshare.registry` names them."""
