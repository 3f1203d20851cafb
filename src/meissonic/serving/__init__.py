"""`meissonic serve`: the model behind HTTP APIs that existing clients speak (OpenAI Images, AUTOMATIC1111).

`engine` owns the model on one worker thread and batches compatible requests; `openai_api` and `a1111_api` turn
each API's requests into `engine.Job`s and their results into that API's responses; `app` is the thin FastAPI shell
around them (keys, limits, errors, health). Nothing here samples: generation is the pipeline's and `meissonic.edit`'s.
"""
