"""HybridMIMSegment: the 3D Slicer module, thin glue over the ``hybridmim`` engine.

The engine runs as a separate process (PythonSlicer -m hybridmim …, see
HybridMIMSegmentLib.engine): the GUI stays responsive, Cancel ends the whole process
tree, and this file never imports torch. Everything that does not need Slicer (running
the engine, the processing states, the command lines, the model list, training-case
export rules, the requirement check) lives in HybridMIMSegmentLib and is tested in CI.
"""

import importlib
import os
import shutil
import sys

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from HybridMIMSegmentLib.casefolders import case_folder, case_labels, relabelled, scan_file, write_labels_file
from HybridMIMSegmentLib.charts import FINETUNE_CHART, PRETRAIN_CHART, chart_row
from HybridMIMSegmentLib.commands import (PRETRAIN_METHODS, PRETRAIN_MODALITIES, devices_command, finetune_command,
                                          pretrain_command, reconstruct_command, segment_command)
from HybridMIMSegmentLib.dependencies import (TORCH_REQUIREMENT, installed_version_fits, missing_requirements,
                                              skip_speedup, speedup_skipped, write_constraints)
from HybridMIMSegmentLib.engine import EngineProcess, run_to_end
from HybridMIMSegmentLib.inputs import shared_transform, volumes_named_as_channels
from HybridMIMSegmentLib.models import UserModels, catalog_choices, needs_conversion
from HybridMIMSegmentLib.results import segment_lines, training_stop_message
from HybridMIMSegmentLib.states import BUSY, Processing, State
from HybridMIMSegmentLib.trainingruns import (TrainingRun, keep_for_resume, last_stopped_run, models_folder,
                                              new_run_paths)
from HybridMIMSegmentLib.workfolders import (new_work_folder, remove_stale_work_folders, remove_work_folder,
                                             removed_on_error)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
RESOURCES = os.path.join(MODULE_DIR, "Resources")
SAMPLE_NAME = "HybridMIMAbdomenCT"
# Slicer closing during a training run waits this long for it to save its state (a step, or a validation case)
STOP_SECONDS = 60
COMPARE_LAYOUT_ID = 47301  # three linked axial views: masked input, reconstruction, error
COMPARE_LAYOUT = """<layout type="horizontal">{}</layout>""".format("".join(
    f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}"><property name="orientation" action="default">'
    f'Axial</property><property name="viewlabel" action="default">{label}</property><property name="viewcolor" '
    f'action="default">{color}</property></view></item>'
    for tag, label, color in (("Red", "M", "#F34A33"), ("Yellow", "R", "#EDD54C"), ("Green", "E", "#6EB04B"))))


class HybridMIMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HybridMIM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["HybridMIMSegment developers"]
        self.parent.helpText = (
            "Segment organs and tumours on CT and MR with 3D encoder-decoders pre-trained by masked image "
            "modelling (HybridMIM, MiM, SelfMedHPM); look at a pre-trained model's reconstructions; fine-tune a "
            "model on your own corrected cases. Models run on the GPU when there is one, otherwise on the CPU. "
            "The same engine runs from a terminal: <code>hybridmim segment INPUT -o OUTPUT.seg.nrrd</code>. "
            "Not for clinical use."
        )
        self.parent.acknowledgementText = (
            "Methods: HybridMIM (Xing et al., IEEE JBHI 2024), MiM (Zhuang et al., IEEE TMI 2025), SelfMedHPM. "
            "Built on MONAI, PyTorch, SimpleITK and VTK."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The catalog's sample CT in the Sample Data module (downloaded once, SHA256-checked)."""
    import SampleData
    from hybridmim.catalog import load_catalog

    sample = load_catalog().sample("abdomen-ct")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="HybridMIM Segment", sampleName=SAMPLE_NAME, uris=sample.url,
        fileNames=f"{SAMPLE_NAME}.nii.gz", nodeNames=SAMPLE_NAME, checksums=f"SHA256:{sample.sha256}",
        thumbnailFileName=os.path.join(RESOURCES, "Icons", "HybridMIMSegment.png"))


class HybridMIMSegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HybridMIMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = HybridMIMSegmentLogic()
        self.processing = Processing("Apply")
        self.training = Processing("Start")  # fine-tuning
        self.pretraining = Processing("Start")
        self.run = None  # (EngineProcess, Processing, on_success, work folder) of the segment/reconstruct run
        self.trainer = None  # the same for the training run: fine-tuning or pre-training, one at a time
        self.inputSelectors = {}  # channel name → volume selector
        self.trainingPairs = []  # (volume node ID, segmentation node ID)
        self.resumeButtons = {self.training: self.ui.resumeButton, self.pretraining: self.ui.pretrainResumeButton}
        self.lastRuns = {}  # Processing → the TrainingRun its Resume continues (kept on disk across sessions)
        self.chart = None  # (table node, ChartSpec) of the training run

        for text, value in (("Auto", "auto"), ("GPU", "cuda"), ("CPU", "cpu")):
            self.ui.deviceComboBox.addItem(text, value)
        for value, text in PRETRAIN_METHODS:
            self.ui.pretrainMethodComboBox.addItem(text, value)
        for value, text in PRETRAIN_MODALITIES:
            self.ui.pretrainModalityComboBox.addItem(text, value)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.loadCheckpointButton.connect("clicked()", self.onLoadCheckpoint)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.reconstructButton.connect("clicked()", self.onReconstruct)
        self.ui.addTrainingPairButton.connect("clicked()", self.onAddTrainingPair)
        self.ui.removeTrainingPairButton.connect("clicked()", self.onRemoveTrainingPair)
        self.ui.finetuneButton.connect("clicked()", self.onFinetune)
        self.ui.resumeButton.connect("clicked()", lambda: self.onResume(self.training))
        self.ui.pretrainButton.connect("clicked()", self.onPretrain)
        self.ui.pretrainResumeButton.connect("clicked()", lambda: self.onResume(self.pretraining))

        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)
        self.refreshModels()
        self.showView(self.processing.view())
        for processing, kind in ((self.training, "finetune"), (self.pretraining, "pretrain")):
            run = last_stopped_run(models_folder(self.logic.userFolder()), kind)
            if run is not None:
                self.lastRuns[processing] = run
                processing.remind(run.reminder())
            self.resumeButtons[processing].enabled = run is not None
        self.showTrainingViews()
        remove_stale_work_folders(slicer.app.temporaryPath)
        self.detectDevices()

    def cleanup(self):
        if self.run is not None:
            self.run[0].cancel()
            remove_work_folder(self.run[3])
        if self.trainer is not None:  # Slicer closing: the run saves its state, Resume continues it next session
            self.trainer[0].finish(timeout=STOP_SECONDS)
        self.timer.stop()

    # --- models and devices -------------------------------------------------------------
    def refreshModels(self, select=None):
        choices = self.logic.modelChoices()
        self.choices = choices
        for combo in (self.ui.modelComboBox, self.ui.baseModelComboBox):
            combo.blockSignals(True)
            combo.clear()
            for choice in choices:
                combo.addItem(choice.label, choice.spec)
                combo.setItemData(combo.count - 1, choice.details, qt.Qt.ToolTipRole)
            combo.blockSignals(False)
        index = next((i for i, c in enumerate(choices) if c.spec == select), 0)
        self.ui.modelComboBox.setCurrentIndex(index)
        self.onModelChanged(index)

    def currentChoice(self):
        index = self.ui.modelComboBox.currentIndex
        return self.choices[index] if 0 <= index < len(self.choices) else None

    def onModelChanged(self, index):
        choice = self.currentChoice()
        self.ui.modelDetailsLabel.text = choice.details if choice else ""
        self.showView(self.processing.view())
        # A channel keeps its volume across models; a new one starts with the volume named as it (a model of
        # several channels), else (the first) the volume on view.
        chosen = {name: selector.currentNode() for name, selector in self.inputSelectors.items()}
        shown = slicer.app.applicationLogic().GetSelectionNode().GetActiveVolumeID()
        scalars = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        named = volumes_named_as_channels(list(choice.channels if choice else ()), [n.GetName() for n in scalars])
        by_name = {node.GetName(): node for node in scalars}
        for selector in self.inputSelectors.values():
            self.ui.inputsWidget.layout().removeRow(selector)
        self.inputSelectors = {}
        for position, name in enumerate(choice.channels if choice else ()):
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.showChildNodeTypes = False  # no label maps
            selector.addEnabled = selector.removeEnabled = False
            selector.noneEnabled = True
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = f"The {name} volume the model expects"
            onView = slicer.mrmlScene.GetNodeByID(shown) if shown and position == 0 else None
            selector.setCurrentNode(chosen.get(name) or by_name.get(named.get(name)) or onView)
            self.ui.inputsWidget.layout().addRow(f"{name}:", selector)
            self.inputSelectors[name] = selector

    def onLoadCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Load checkpoint", "",
            "Checkpoints (*.safetensors *.pt *.pth *.ckpt)")
        if not path:
            return
        try:
            choice = self.logic.addUserModel(path, self.log)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error))
            return
        self.refreshModels(select=choice.spec)

    def detectDevices(self):
        engine = EngineProcess(devices_command(), python=self.logic.python())
        try:
            engine.start()
        except OSError as error:
            self.ui.deviceStatusLabel.text = f"cannot start the engine: {error}"
            return
        self.deviceProbe = engine
        self.timer.start()

    # --- segment and reconstruct --------------------------------------------------------
    def inputVolumes(self):
        volumes = [selector.currentNode() for selector in self.inputSelectors.values()]
        if not volumes or None in volumes:
            raise RuntimeError("Choose an input volume for every channel the model expects.")
        return volumes

    def onApply(self):
        if self.processing.state in BUSY:
            self.cancelRun()
            return
        try:
            self.logic.ensureDependencies()
            volumes = self.inputVolumes()
            target = self.ui.outputSegmentationSelector.currentNode()
            if target is not None and not slicer.util.confirmOkCancelDisplay(
                    f"Replace the segments of '{target.GetName()}' with the model's result?"):
                return
            choice = self.currentChoice()
            command, output, folder = self.logic.segmentCommand(volumes, choice.spec,
                                                                self.ui.deviceComboBox.currentData)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error))
            return
        show3D = self.ui.show3DCheckBox.checked

        def imported(result):
            node = self.logic.importSegmentation(output, volumes[0], target, choice.label, show3D)
            for line in segment_lines(result.outputs["segments"]):
                self.log(line)
            found = sum(1 for s in result.outputs["segments"] if s["volume_ml"] > 0)
            return f"{found} of {len(result.outputs['segments'])} segments found in {result.outputs['seconds']} s " \
                   f"({result.outputs['device']}): {node.GetName()}"

        self.startRun(command, imported, folder)

    def onReconstruct(self):
        if self.processing.state in BUSY:
            slicer.util.errorDisplay("Wait for the current run to end (or cancel it) first.")
            return
        try:
            self.logic.ensureDependencies()
            choice = self.currentChoice()
            model = choice.spec if choice is not None and choice.task == "reconstruction" else None
            volumes = self.inputVolumes() if model else [self.firstVolume()]
            command, _, folder = self.logic.reconstructCommand(volumes, model, self.ui.maskRatioSpinBox.value,
                                                               self.ui.seedSpinBox.value,
                                                               self.ui.deviceComboBox.currentData)
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error))
            return

        def shown(result):
            self.logic.showReconstruction(result.outputs, volumes[0].GetTransformNodeID())
            return f"masked-voxel error: model {result.outputs['mae_model']}, interpolation " \
                   f"{result.outputs['mae_interpolation']} (input units)"

        self.startRun(command, shown, folder)

    def firstVolume(self):
        volume = next(iter(self.inputSelectors.values())).currentNode() if self.inputSelectors else None
        if volume is None:
            raise RuntimeError("Choose an input volume first.")
        return volume

    def startRun(self, command, onSuccess, folder):
        """Run a segment/reconstruct command whose files are in ``folder`` (removed when the run ends)."""
        self.ui.logTextEdit.clear()
        self.log("$ hybridmim " + " ".join(command))
        self.run = self.launch(command, self.processing, self.showView, onSuccess, folder)

    def launch(self, command, processing, show, onSuccess, folder=None):
        """Start the engine for ``processing``; the timer follows it. None when it could not start."""
        engine = EngineProcess(command, python=self.logic.python())
        show(processing.go(State.STARTING))
        try:
            engine.start()
        except OSError as error:
            show(processing.go(State.FAILED, f"cannot start the engine: {error}"))
            if folder is not None:
                remove_work_folder(folder)
            return None
        self.timer.start()
        return engine, processing, onSuccess, folder

    def cancelRun(self):
        engine, processing, _, _ = self.run
        self.showView(processing.go(State.CANCELLING))
        engine.cancel()

    # --- fine-tuning ----------------------------------------------------------------------
    def onAddTrainingPair(self):
        volume = self.ui.trainVolumeSelector.currentNode()
        segmentation = self.ui.trainSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.errorDisplay("Choose a volume and the segmentation you corrected on it.")
            return
        self.trainingPairs.append((volume.GetID(), segmentation.GetID()))
        self.ui.trainingPairsList.addItem(f"{volume.GetName()}  ←  {segmentation.GetName()}")

    def onRemoveTrainingPair(self):
        row = self.ui.trainingPairsList.currentRow
        if 0 <= row < len(self.trainingPairs):
            del self.trainingPairs[row]
            self.ui.trainingPairsList.takeItem(row)

    def onFinetune(self):
        def commands():
            pairs = [(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s)) for v, s in self.trainingPairs]
            index = self.ui.baseModelComboBox.currentIndex
            if not 0 <= index < len(self.choices):
                raise RuntimeError("Choose the model to start from.")
            base = self.choices[index]
            return self.logic.finetuneCommands(pairs, self.ui.trainingFolderPathLineEdit.currentPath, base.spec,
                                               base.labels, self.ui.epochsSpinBox.value,
                                               self.ui.deviceComboBox.currentData,
                                               self.ui.timeLimitSpinBox.value or None, self.log)

        self.startOrStopTraining(self.training, commands)

    # --- pre-training -----------------------------------------------------------------------
    def onPretrain(self):
        self.startOrStopTraining(self.pretraining, lambda: self.logic.pretrainCommands(
            list(self.ui.pretrainVolumesComboBox.checkedNodes()), self.ui.pretrainFolderPathLineEdit.currentPath,
            self.ui.pretrainMethodComboBox.currentData, self.ui.deviceComboBox.currentData,
            self.ui.pretrainTimeSpinBox.value, self.ui.pretrainModalityComboBox.currentData))

    # --- training runs (fine-tuning and pre-training) -----------------------------------------
    def startOrStopTraining(self, processing, commands):
        """Stop the section's run (it saves its state: Resume continues it), or start one with ``commands()``:
        (start command, output checkpoint, resume command)."""
        if processing.state in BUSY:
            self.trainer[0].stop()
            processing.go(State.CANCELLING)
            self.showTrainingViews()
            return
        from hybridmim.errors import UserError

        try:
            self.logic.ensureDependencies()
            command, run = commands()
        except (RuntimeError, UserError) as error:
            slicer.util.errorDisplay(str(error))
            return
        if processing in self.lastRuns:  # a new run replaces the stopped one (the terminal can still resume it)
            self.lastRuns.pop(processing).forget()
        run.save()
        self.lastRuns[processing] = run
        self.startTraining(command, run.output, processing)

    def onResume(self, processing):
        if processing in self.lastRuns and self.trainer is None:
            run = self.lastRuns[processing]
            self.startTraining(list(run.resume), run.output, processing)

    def startTraining(self, command, output, processing):
        self.chart = self.logic.newTrainingChart(FINETUNE_CHART if processing is self.training else PRETRAIN_CHART)
        self.resumeButtons[processing].enabled = False

        def added(result):
            stopped = training_stop_message(result.outputs)
            if stopped:
                return stopped
            choice = self.logic.addUserModel(output, self.log)
            self.refreshModels(select=choice.spec)
            if processing is self.training:
                return f"Done: {choice.label} added to the models and selected."
            self.ui.baseModelComboBox.setCurrentIndex(self.ui.baseModelComboBox.findData(choice.spec))
            return f"Done: {choice.label} added to the models. Show reconstruction shows what it learnt; " \
                   "fine-tuning now starts from it."

        self.trainer = self.launch(command, processing, self.showTrainingViews, added)

    # --- events from the engine -----------------------------------------------------------
    def onTimer(self):
        probe = getattr(self, "deviceProbe", None)
        if probe is not None and not probe.running:
            result = probe.wait()
            from hybridmim.modelinfo import describe_devices

            self.ui.deviceStatusLabel.text = describe_devices(result.outputs) if result.succeeded else \
                f"device check failed: {result.error}"
            self.deviceProbe = None
        for attribute, show in (("run", self.showView), ("trainer", self.showTrainingViews)):
            if getattr(self, attribute) is not None and self.follow(getattr(self, attribute), show):
                setattr(self, attribute, None)
        if self.run is None and self.trainer is None and getattr(self, "deviceProbe", None) is None:
            self.timer.stop()

    def follow(self, run, show):
        """Apply the run's new events; True once it has ended and been handled (its work folder removed)."""
        engine, processing, onSuccess, folder = run
        events, result = engine.poll()
        for event in events:
            if event["event"] == "message":
                self.log(("warning: " if event["level"] == "warning" else "") + event["text"])
            elif event["event"] == "metric" and processing in self.resumeButtons:
                self.logic.addChartPoint(self.chart, event)
            if processing.state in (State.STARTING, State.RUNNING):
                show(processing.on_event(event))
        if result is None:
            return False
        try:
            self.finishRun(result, processing, show, onSuccess)
        finally:
            if folder is not None:
                remove_work_folder(folder)
        return True

    def finishRun(self, result, processing, show, onSuccess):
        """Show how the run ended; a succeeded run's results go into the scene first."""
        for line in result.log[-20:] if not result.succeeded else ():
            self.log(line)
        if result.cancelled:
            if processing.state is not State.CANCELLING:
                processing.go(State.CANCELLING)
            show(processing.go(State.CANCELLED))
        elif result.succeeded:  # a stopped training run ends normally too
            show(processing.go(State.IMPORTING))
            try:
                message = onSuccess(result)
            except Exception as error:  # the scene import failed: say so, keep the GUI usable
                show(processing.go(State.FAILED, str(error)))
                return
            show(processing.go(State.DONE, message))
        else:
            show(processing.go(State.FAILED, result.error or "the engine failed"))
        if processing in self.lastRuns and not keep_for_resume(self.lastRuns[processing], result.succeeded,
                                                               result.outputs):
            del self.lastRuns[processing]
        if processing in self.resumeButtons:
            self.resumeButtons[processing].enabled = processing in self.lastRuns

    def showView(self, view):
        choice = self.currentChoice()
        segments = choice is not None and choice.task == "segmentation"  # a pre-trained model only reconstructs
        self.ui.applyButton.text = view.button_text
        self.ui.applyButton.enabled = view.button_enabled and (segments or self.processing.state in BUSY)
        self.ui.modelComboBox.enabled = self.ui.loadCheckpointButton.enabled = view.inputs_enabled
        self.ui.reconstructButton.enabled = view.inputs_enabled
        self.ui.progressBar.visible = view.progress_visible
        self.ui.progressBar.value = self.processing.percent
        self.ui.statusLabel.text = view.status

    def showTrainingViews(self, _changed=None):
        """Both training sections, each from its own state (so the view of the run that changed, passed by
        launch and follow, is not needed): one training run at a time, a section's Start waits for the other's."""
        for processing, button, status, other in (
                (self.training, self.ui.finetuneButton, self.ui.finetuneStatusLabel, self.pretraining),
                (self.pretraining, self.ui.pretrainButton, self.ui.pretrainStatusLabel, self.training)):
            view = processing.view()
            button.text = "Stop" if view.button_text == "Cancel" else view.button_text
            button.enabled = view.button_enabled and other.state not in BUSY
            status.text = view.status

    def log(self, text):
        self.ui.logTextEdit.appendPlainText(text)


def slicerPackaging():
    """Slicer's module with pip_ensure (Slicer >= 5.11 names it slicer.packaging or slicer.pydeps, a
    submodule that is not always imported with slicer), or None for older Slicer."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module
    return None


class HybridMIMSegmentLogic(ScriptedLoadableModuleLogic):
    """What the panel does, usable from scripts: ``process(…, waitForCompletion=True)``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependenciesChecked = False
        self.userModels = UserModels(os.path.join(self.userFolder(), "user-models.json"))

    @staticmethod
    def userFolder():
        return os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "HybridMIMSegment")

    @staticmethod
    def python():
        """PythonSlicer: Slicer's Python with the engine's packages, as a separate process."""
        return shutil.which("PythonSlicer") or sys.executable

    def ensureDependencies(self):
        """torch through the PyTorch extension, the rest from Resources/requirements.txt, then the optional CPU
        speed-up on its own (a failure there leaves the models on torch); asks first."""
        if self.dependenciesChecked:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("This module needs the PyTorch extension: install it from the Extensions Manager.")
        if not installed_version_fits("torch", TORCH_REQUIREMENT):
            if slicer.app.testingEnabled():
                raise RuntimeError(f"PyTorch {TORCH_REQUIREMENT} is not installed (testing mode installs nothing).")
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError(f"PyTorch {TORCH_REQUIREMENT} is needed to run the models.")
        constraints = str(write_constraints(self.userFolder()))
        self.installRequirements(os.path.join(RESOURCES, "requirements.txt"), "HybridMIM Segment", constraints)
        speedup = os.path.join(RESOURCES, "requirements-cpu-speedup.txt")
        if missing_requirements(speedup) and not slicer.app.testingEnabled() \
                and not speedup_skipped(self.userFolder()):
            try:
                self.installRequirements(speedup, "HybridMIM Segment's optional CPU speed-up (about 2x faster)",
                                         constraints)
            except Exception as error:  # declined, or no OpenVINO fits what Slicer ships
                skip_speedup(self.userFolder())
                print(f"HybridMIM Segment: the optional CPU speed-up (OpenVINO) was not installed ({error}); the "
                      "models run on torch. It is offered again after a Slicer or PyTorch update.")
        self.dependenciesChecked = True

    @staticmethod
    def installRequirements(requirements, requester, constraints):
        """Install what the file ``requirements`` lists and is missing, held to ``constraints``; asks first."""
        packaging = slicerPackaging()
        if packaging is not None:
            packaging.pip_ensure(packaging.load_requirements(requirements), constraints=constraints,
                                 requester=requester)
            return
        missing = missing_requirements(requirements)
        if not missing:
            return
        if slicer.app.testingEnabled():
            raise RuntimeError(f"Missing Python packages: {', '.join(missing)} (testing mode installs nothing).")
        if not slicer.util.confirmOkCancelDisplay(f"{requester} needs these Python packages: {', '.join(missing)}. "
                                                  "Install them now?"):
            raise RuntimeError("The required Python packages were not installed.")
        slicer.util.pip_install(["-r", requirements, "-c", constraints])

    def modelChoices(self):
        return catalog_choices() + self.userModels.choices()

    def addUserModel(self, path, log=print):
        """Remember a checkpoint; an official .pt is converted into the user folder first."""
        if needs_conversion(path):
            self.ensureDependencies()
            converted = str(models_folder(self.userFolder()) / (os.path.splitext(os.path.basename(path))[0]
                                                                + ".safetensors"))
            result = run_to_end(["convert", path, "-o", converted], self.python())
            if not result.succeeded:
                raise RuntimeError(f"Could not convert {path}: {result.error}")
            log(f"converted {path} into {converted}")
            path = converted
        from hybridmim.errors import UserError

        try:
            return self.userModels.add(path)
        except UserError as error:
            raise RuntimeError(str(error))

    @staticmethod
    def workFolder():
        # Slicer's temporary folder itself, where the next start's sweep looks (slicer.util.tempDirectory would
        # make a new dated folder on every call)
        return str(new_work_folder(slicer.app.temporaryPath))

    @staticmethod
    def exportVolume(volume, path, compressed=True):
        """Write ``volume`` for the engine; uncompressed for a file read once (a CT's zlib costs seconds)."""
        if not slicer.util.exportNode(volume, str(path), {"useCompression": compressed}):
            raise RuntimeError(f"Could not write {volume.GetName()} for the engine.")
        return str(path)

    def exportVolumes(self, volumes, folder):
        """The channels of a run, written in their own coordinates: they must share their transform."""
        shared_transform([(volume.GetName(), volume.GetTransformNodeID(),
                           volume.GetParentTransformNode().GetName() if volume.GetParentTransformNode() else None)
                          for volume in volumes])
        return [self.exportVolume(volume, os.path.join(folder, f"input_{index}.nrrd"), compressed=False)
                for index, volume in enumerate(volumes)]

    def runInputs(self, volumes):
        """(a new work folder, the channels exported into it); the folder goes if the export fails."""
        folder = self.workFolder()
        with removed_on_error(folder):
            return folder, self.exportVolumes(volumes, folder)

    def segmentCommand(self, volumes, model, device):
        """(command, output file, work folder to remove after the run)."""
        folder, inputs = self.runInputs(volumes)
        output = os.path.join(folder, "segmentation.seg.nrrd")
        return segment_command(inputs, output, model, device), output, folder

    def reconstructCommand(self, volumes, model, maskRatio, seed, device):
        """(command, output folder, work folder to remove after the run)."""
        folder, inputs = self.runInputs(volumes)
        output = os.path.join(folder, "reconstruction")
        return reconstruct_command(inputs, output, model, maskRatio, seed, device), output, folder

    def process(self, volumes, model=None, device="auto", waitForCompletion=True, target=None, show3D=False):
        """Segment ``volumes`` (one per channel) into a segmentation node, for scripts and the self-test."""
        if not waitForCompletion:
            raise ValueError("from scripts, use waitForCompletion=True; the panel runs it in the background")
        self.ensureDependencies()
        command, output, folder = self.segmentCommand(volumes, model, device)
        try:
            result = run_to_end(command, self.python())
            if not result.succeeded:
                raise RuntimeError(result.error or "the engine failed")
            return self.importSegmentation(output, volumes[0], target, model or "default model", show3D)
        finally:
            remove_work_folder(folder)

    @staticmethod
    def importSegmentation(path, referenceVolume, target, modelName, show3D):
        """The engine's .seg.nrrd (names, colours, terminology) as a node under the input's study; a node of
        its own, not tied to the file (which goes with the run's work folder: saving the scene writes it)."""
        loaded = slicer.util.loadSegmentation(path)
        node = target
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(
                    f"{referenceVolume.GetName()} segmentation"))
            node.CreateDefaultDisplayNodes()
        node.GetSegmentation().DeepCopy(loaded.GetSegmentation())
        slicer.mrmlScene.RemoveNode(loaded)
        node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())  # computed in its coordinates
        node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(referenceVolume))
        if study:
            hierarchy.SetItemParent(hierarchy.GetItemByDataNode(node), study)
        node.SetAttribute("HybridMIMSegment.model", modelName)
        if show3D:
            node.CreateClosedSurfaceRepresentation()
        return node

    @staticmethod
    def showReconstruction(outputs, transformID=None):
        """Masked input, reconstruction and error side by side in linked axial views, the mask over each; under
        the input's transform (``transformID``), as the input is."""
        def first(kind):  # several channels: masked_flair, masked_t1c, …; the first is shown
            return next(outputs[key] for key in outputs if key == kind or key.startswith(kind + "_"))

        volumes = [slicer.util.loadVolume(first(kind)) for kind in ("masked", "reconstruction", "error")]
        mask = slicer.util.loadLabelVolume(outputs["mask"])
        for node in (*volumes, mask):  # their files go with the run's work folder: saving the scene writes them
            slicer.mrmlScene.RemoveNode(node.GetStorageNode())
            node.SetAndObserveTransformNodeID(transformID)
        layoutNode = slicer.app.layoutManager().layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, COMPARE_LAYOUT)
        layoutNode.SetViewArrangement(COMPARE_LAYOUT_ID)
        for view, volume in zip(("Red", "Yellow", "Green"), volumes):
            composite = slicer.app.layoutManager().sliceWidget(view).mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLabelVolumeID(mask.GetID())
            composite.SetLabelOpacity(0.25)
            composite.SetLinkedControl(True)
        slicer.util.resetSliceViews()

    def finetuneCommands(self, pairs, folder, init, initLabels, epochs, device, max_minutes=None, log=print):
        """(start command, TrainingRun) for the scene's pairs and/or a case folder, from the model ``init``
        (which segments ``initLabels``)."""
        if not pairs and not folder:
            raise RuntimeError("Add at least one volume + corrected segmentation pair, or choose a case folder.")
        output, exports = new_run_paths(self.userFolder(), "finetuned")
        data, labels = [], None
        if pairs:
            root = os.path.join(exports, "cases")
            with removed_on_error(exports):
                labels = self.exportTrainingCases(pairs, root, initLabels, log)
            data.append(root)
        if folder:
            data.append(folder)
        run = TrainingRun("finetune", output, tuple(finetune_command(init, data, output, device=device, resume=True)),
                          exports if pairs else None)
        return finetune_command(init, data, output, epochs, labels, device=device, max_minutes=max_minutes), run

    def pretrainCommands(self, volumes, folder, method, device, max_minutes, modality):
        """(start command, TrainingRun) for the scene's ``volumes`` and/or a folder of ``modality`` scans."""
        if not volumes and not folder:
            raise RuntimeError("Check the scene volumes to learn from, or choose a folder of scans.")
        output, exports = new_run_paths(self.userFolder(), f"pretrained-{method}-{modality.lower()}")
        data = []
        if volumes:
            root = os.path.join(exports, "scans")
            with removed_on_error(exports):
                os.makedirs(root)
                for index, volume in enumerate(volumes):
                    self.exportVolume(volume, scan_file(root, index, volume.GetName()))
            data.append(root)
        if folder:
            data.append(folder)
        run = TrainingRun("pretrain", output, tuple(pretrain_command(data, output, method, device, resume=True)),
                          exports if volumes else None)
        return pretrain_command(data, output, method, device, max_minutes=max_minutes, modality=modality), run

    def exportTrainingCases(self, pairs, root, initLabels, log):
        """Each pair as a case folder (image + label map); returns the run's labels file, or None where the
        segments are the init model's labels (see HybridMIMSegmentLib.casefolders.case_labels)."""
        cases = []
        for _, segmentation in pairs:
            segments = segmentation.GetSegmentation()
            ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
            described = []
            for segmentId in ids:
                segment = segments.GetSegment(segmentId)
                tag = vtk.mutable("")
                segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
                described.append({"name": segment.GetName(), "color": segment.GetColor(), "terminology": str(tag)})
            cases.append((ids, (segmentation.GetName(), described)))
        plan = case_labels([named for _, named in cases], initLabels)
        for line in plan.notes:
            log(line)
        for index, ((volume, segmentation), (ids, _), values) in enumerate(zip(pairs, cases, plan.values)):
            exported = vtk.vtkStringArray()
            for segmentId in ids:
                exported.InsertNextValue(segmentId)
            paths = case_folder(root, index, volume.GetName())
            os.makedirs(paths["folder"], exist_ok=True)
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            try:
                segmentations = slicer.modules.segmentations.logic()
                segmentations.ExportSegmentsToLabelmapNode(segmentation, exported, labelmap, volume)
                slicer.util.updateVolumeFromArray(labelmap, relabelled(slicer.util.arrayFromVolume(labelmap), values))
                self.exportVolume(volume, paths["image"])
                self.exportVolume(labelmap, paths["label"])
            finally:
                slicer.mrmlScene.RemoveNode(labelmap)
        if plan.labels is None:
            return None
        return str(write_labels_file(os.path.join(root, "labels.json"), plan.labels))

    @staticmethod
    def newTrainingChart(spec):
        """A table and a chart of the run's curves (``spec``: a HybridMIMSegmentLib.charts.ChartSpec), shown in
        the plot view; returns what addChartPoint takes."""
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", spec.title)
        for name in spec.columns:
            column = table.AddColumn(vtk.vtkDoubleArray())
            column.SetName(name)
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", spec.title)
        chart.SetXAxisTitle(spec.x)
        for field, legend in spec.series:
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", legend)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(spec.x)
            series.SetYColumnName(field)
            series.SetPlotType(series.PlotTypeScatter)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return table, spec

    @staticmethod
    def addChartPoint(chart, metric):
        table, spec = chart
        row = chart_row(spec, metric)
        if row is None:
            return
        index = table.AddEmptyRow()
        for column, value in enumerate(row):
            table.GetTable().GetColumn(column).SetValue(index, value)
        table.GetTable().Modified()


class HybridMIMSegmentTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the sample CT, the bundled default model on the CPU, the result in the scene and exported
    as a fine-tuning case."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_catalog_lists_the_default_model()
        self.setUp()
        self.test_default_model_on_the_sample_ct()

    def test_catalog_lists_the_default_model(self):
        from hybridmim.catalog import load_catalog

        names = [choice.spec for choice in catalog_choices()]
        self.assertEqual(names[0], load_catalog().default_model)
        self.assertTrue(os.path.isfile(os.path.join(RESOURCES, "Models", "catalog.json")))

    def test_default_model_on_the_sample_ct(self):
        """Names, colours and terminology from the model; the result under the volume's transform; the scene's
        labels equal the engine's own file."""
        import numpy as np
        import SampleData
        from hybridmim.catalog import load_catalog, resolve_model
        from hybridmim.checkpoint import read_metadata
        from hybridmim.progress import Reporter

        registerSampleData()
        volume = SampleData.downloadSample(SAMPLE_NAME)
        shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")  # as after a registration
        shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(
            np.array([[1, 0, 0, 40], [0, 1, 0, 0], [0, 0, 1, -25], [0, 0, 0, 1]], dtype=float)))
        volume.SetAndObserveTransformNodeID(shift.GetID())
        logic = HybridMIMSegmentLogic()
        node = logic.process([volume], device="cpu")
        self.assertEqual(node.GetTransformNodeID(), shift.GetID())  # the result lies on the volume as shown
        meta = read_metadata(resolve_model(load_catalog().default_model, Reporter("quiet")))
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [label.name for label in meta.labels])
        liver = next(label for label in meta.labels if label.name == "liver")
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
        tag = vtk.mutable("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        self.assertIn(liver.terminology["type"][1], str(tag))

        # Dice of the scene's liver against the engine's label map for the same volume.
        folder, inputs = logic.runInputs([volume])
        reference = os.path.join(folder, "reference.nii.gz")
        result = run_to_end(segment_command(inputs, reference, device="cpu"), logic.python())
        self.assertTrue(result.succeeded, result.error)
        referenceNode = slicer.util.loadLabelVolume(reference)
        remove_work_folder(folder)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName("liver"))
        slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        scene = slicer.util.arrayFromVolume(labelmap) > 0
        engine = slicer.util.arrayFromVolume(referenceNode) == liver.value
        dice = 2 * np.logical_and(scene, engine).sum() / max(1, scene.sum() + engine.sum())
        self.assertGreater(dice, 0.99)
        self.delayDisplay(f"default model on the sample CT: liver Dice vs the engine's file {dice:.4f}")

        # The result, corrected (the stomach deleted, the liver moved first), as a fine-tuning case for the same
        # model: no labels file (the model's own labels, its output layer kept), each voxel its label's value.
        stomach = next(label for label in meta.labels if label.name == "stomach")
        segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("stomach"))
        segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("liver"), 0)
        root = slicer.util.tempDirectory()
        self.assertIsNone(logic.exportTrainingCases([(volume, node)], root, meta.labels, print))
        case = slicer.util.loadLabelVolume(str(case_folder(root, 0, volume.GetName())["label"]))
        expected = slicer.util.arrayFromVolume(referenceNode).copy()
        expected[expected == stomach.value] = 0
        agreement = (slicer.util.arrayFromVolume(case) == expected)[expected > 0].mean()
        self.assertGreater(agreement, 0.99)
        self.delayDisplay(f"exported as a fine-tuning case: {agreement:.4f} of the labelled voxels as the engine's")
