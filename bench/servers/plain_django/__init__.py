"""A minimal Django project streaming from a plain async view (the baseline).

Two settings modules: ``settings`` (no middleware, no authentication) and
``settings_mw`` (Django's default middleware; streams need a session cookie).
"""
