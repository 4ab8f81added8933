"""Adaptive updates: install a new image from the chunks the device already holds plus the ones it fetches.

``index`` is the format (pure); the build host cuts an image with ``cut``; the device plans (``plan``), fetches
the missing chunks with Range requests (``ranges``) and writes them in image order (``apply``); ``store`` keeps
the verified index of what each slot holds.
"""
