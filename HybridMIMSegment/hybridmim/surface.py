"""Off-screen 3-D surface rendering of a label map with VTK (for the QA preview)."""

from __future__ import annotations

import os
import sys

import numpy as np


def _prefer_headless_window() -> None:
    # Without a display, VTK would first try X and print a warning; EGL renders off-screen.
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def render_label_surfaces(labels_zyx: np.ndarray, spacing_xyz, colors: dict[int, tuple[int, int, int]],
                          size: int = 600) -> np.ndarray:
    """RGB image (size, size, 3) of each label's smoothed surface, seen from the front.

    ``labels_zyx`` must be in LPS orientation (i towards the patient's left,
    j posterior, k superior): the camera looks from anterior with superior up,
    so the patient's right is on the viewer's left, as in a radiograph.
    """
    _prefer_headless_window()
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonCore import vtkLookupTable
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals, vtkWindowedSincPolyDataFilter
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D
    from vtkmodules.vtkRenderingCore import (vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                             vtkWindowToImageFilter)
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window)

    present = [int(v) for v in np.unique(labels_zyx) if v != 0]
    image = vtkImageData()
    image.SetDimensions(labels_zyx.shape[2], labels_zyx.shape[1], labels_zyx.shape[0])
    image.SetSpacing(*spacing_xyz)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(labels_zyx).ravel(), deep=True))

    renderer = vtkRenderer()
    renderer.SetBackground(0.08, 0.08, 0.1)
    if present:
        surfaces = vtkDiscreteFlyingEdges3D()
        surfaces.SetInputData(image)
        for i, value in enumerate(present):
            surfaces.SetValue(i, value)
        smooth = vtkWindowedSincPolyDataFilter()
        smooth.SetInputConnection(surfaces.GetOutputPort())
        smooth.SetNumberOfIterations(15)
        smooth.SetPassBand(0.05)
        smooth.NonManifoldSmoothingOn()
        smooth.NormalizeCoordinatesOn()
        normals = vtkPolyDataNormals()
        normals.SetInputConnection(smooth.GetOutputPort())
        table = vtkLookupTable()
        top = max(present)
        table.SetNumberOfTableValues(top + 1)
        table.SetTableRange(0, top)
        for value in range(top + 1):
            r, g, b = colors.get(value, (200, 200, 200))
            table.SetTableValue(value, r / 255, g / 255, b / 255, 1.0)
        table.Build()
        mapper = vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.SetLookupTable(table)
        mapper.SetScalarRange(0, top)
        mapper.SetScalarModeToUsePointData()
        mapper.SetColorModeToMapScalars()  # uint8 scalars would otherwise be taken as colours
        actor = vtkActor()
        actor.SetMapper(mapper)
        renderer.AddActor(actor)

    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    camera = renderer.GetActiveCamera()
    bounds = np.array([0, (labels_zyx.shape[2] - 1) * spacing_xyz[0], 0, (labels_zyx.shape[1] - 1) * spacing_xyz[1],
                       0, (labels_zyx.shape[0] - 1) * spacing_xyz[2]])
    centre = bounds.reshape(3, 2).mean(axis=1)
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] - 1000.0, centre[2])  # anterior is -y in LPS
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.Update()
    output = grab.GetOutput()
    width, height, _ = output.GetDimensions()
    pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, 3)
    window.Finalize()
    return np.flipud(pixels).copy()  # VTK's rows run bottom-up
