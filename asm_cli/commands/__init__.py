"""The ``asm`` commands, one module each; ``_common`` holds what several share, ``_secrets`` a server's
secret hand-over. Each module has ``add_parser(sub)``, which adds its parser and sets ``func``."""
