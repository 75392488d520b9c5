"""The MFPruner demo (a Gradio app), behind the top-level app.py that a Space runs.

    loading    the model: a repo, or a registry family's built-in tiny random-weights model
    inputs     the upload, the question and the API's numbers, checked
    analysis   one run: prefill pruned and unpruned (timed), answers, counts, FLOPs
    render     tokens drawn over the regions of the original image they cover
    ui         the page text, the Gradio layout and events, launching

It imports the shipped model code and `mfpruner_lib` only, never the command-line scripts.
"""
