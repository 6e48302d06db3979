"""The example programs' pieces: the file server behind ``remotedialer dummy``
(:mod:`~remotedialer.examples.file_server`), the self-check behind
``remotedialer demo`` (:mod:`~remotedialer.examples.demo`) and their logging
set-up (:mod:`~remotedialer.examples.logs`)."""
