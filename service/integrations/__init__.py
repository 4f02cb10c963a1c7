"""Braid behind the Python RAG frameworks: ``braid.integrations.langchain`` (``braidsearch[langchain]``)
and ``braid.integrations.llamaindex`` (``braidsearch[llamaindex]``).

Each adapter speaks braid.v1 through the project's own clients (service/client.py, service/aio.py),
held and called the same way by both through ``clients.StoreClients``, and imports its framework
only in its own module, so ``braid.integrations`` itself needs no extra.
"""
