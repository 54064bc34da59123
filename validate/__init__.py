"""The study that compares an executor's measurements with the simulator's prediction.

Here: the runs measured (``validation``, ``measure``, ``runs``), fidelity and answers
(``fidelity``, ``answers``, ``generated``, ``jobs``), throughput at a KV budget
(``budget``), the cost-model fit (``cost_fit``), the report (``report``) and the demo pipeline
(``pipeline``). Beside them: ``engine/`` (the paged KV engine on torch and its front ends),
``vllm/`` (real vLLM as an executor) and ``workload/`` (workload-only traces made runnable).
"""
