"""Publishing: the fine-tuned model's collection put behind the production alias, atomically, and rolled back.

    production  the Qdrant side: connect, read an alias, m3tune's record on a collection, switch, roll back,
                list, delete old collections m3tune made
    payloads    each passage's payload: copied from the production collection, else from passages.jsonl
    upload      batched, parallel, resumable upload with retries on 5xx and timeouts
    gate        the new model against the published one on the held-out gold (evaluate's paired test)
    verify      the new collection against the corpus, the model and evaluate's metrics
    step        the `publish` step that runs them in that order
"""
