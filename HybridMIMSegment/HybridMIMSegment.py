"""HybridMIMSegment: the 3D Slicer module (thin glue over the ``hybridmim`` engine).

The engine runs as a separate process (``PythonSlicer -m hybridmim …``); this
file never imports torch. The full panel comes with the module issue; this
version registers the module and shows the bundled model catalog.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class HybridMIMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HybridMIM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["HybridMIMSegment developers"]
        self.parent.helpText = (
            "Segment organs and tumours on CT and MR with 3D encoder-decoders pre-trained by masked image "
            "modelling (HybridMIM, MiM, SelfMedHPM). Models run on the GPU when there is one, otherwise on the CPU. "
            "The same engine runs from a terminal: <code>hybridmim segment INPUT -o OUTPUT.seg.nrrd</code>. "
            "Not for clinical use."
        )
        self.parent.acknowledgementText = (
            "Methods: HybridMIM (Xing et al., IEEE JBHI 2024), MiM (Zhuang et al., IEEE TMI 2025), SelfMedHPM. "
            "Built on MONAI, PyTorch, SimpleITK and VTK."
        )


class HybridMIMSegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        box = qt.QGroupBox("Bundled models")
        layout = qt.QVBoxLayout(box)
        for entry in HybridMIMSegmentLogic().catalogModels():
            label = qt.QLabel(f"<b>{entry.name}</b> ({entry.modality}): {entry.title}")
            label.wordWrap = True
            label.toolTip = entry.description
            layout.addWidget(label)
        self.layout.addWidget(box)
        self.layout.addStretch(1)


class HybridMIMSegmentLogic(ScriptedLoadableModuleLogic):
    def catalogModels(self):
        """Entries of the model catalog (reading it needs no torch)."""
        from hybridmim.catalog import load_catalog

        return load_catalog().models


class HybridMIMSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_catalog_lists_default_model()

    def test_catalog_lists_default_model(self):
        names = [entry.name for entry in HybridMIMSegmentLogic().catalogModels()]
        self.assertIn("abdomen-ct-scratch", names)
        moduleDir = os.path.dirname(slicer.modules.hybridmimsegment.path)
        self.assertTrue(os.path.isfile(os.path.join(moduleDir, "Resources", "Models", "catalog.json")))
