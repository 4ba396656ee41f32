"""The ``zero-ckpt`` command line: click commands that parse, call one library function, print.

One module per command (``inspect_cmd``, ``verify_cmd``, ``reshard_cmd``, ``consolidate_cmd``);
:mod:`cli.main` assembles them and turns errors into one-line messages and exit codes.
Library imports happen inside the commands so ``zero-ckpt --help`` does not load torch.
"""
