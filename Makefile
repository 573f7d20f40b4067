# The two commands of the README. Each creates .venv (and installs) when needed.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.mscn-installed
DATA  := datasets/data/era5_t_z_3deg_2017-01-01_float32.nc
CKPT  := plugins/checkpoints/era5_t850.safetensors
OUT   := out/demo
# Held-out ERA5 members (never seen in training, see plugins/checkpoints/README.md)
HELD  := --var t --sel isobaricInhPa=850 --sel number=8,9

# Held out from the general climate checkpoint (plugins/checkpoints/README.md): a Gaussian-grid
# model's 300 hPa wind and an ocean model's curvilinear SST
GAUSS := datasets/data/t42_gaussian_uv300_U.nc
CURVI := datasets/data/mpiom_tos_curvilinear_crop.nc

# Held-out mesh (never in training or validation, see datasets/data/meshes/split.json)
MESH  := datasets/data/meshes/bunny00.ply
SDF   := plugins/checkpoints/shapes_sdf.safetensors
VOX   := plugins/checkpoints/shapes_voxel.safetensors

# Held-out scene: renders of a real jeep mesh, never trained on (datasets/data/scenes/README.md)
SCENE := datasets/data/scenes/test/jeep1
NERF  := plugins/checkpoints/nerf_scenes.safetensors

.PHONY: test demo setup checkpoint climate-checkpoint shape-checkpoints nerf-checkpoint fuzz clean

$(STAMP): pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The structural fuzzer for 10 minutes (make test runs it for 45 s); report in out/fuzz.json.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzzing.py --seconds $${FUZZ_SECONDS:-600} --report out/fuzz.json

demo: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/mscn inspect $(CKPT)
	$(BIN)/mscn fit $(DATA) $(HELD) --checkpoint $(CKPT) -o $(OUT)/t850_recon.nc --overwrite
	$(BIN)/mscn fit $(DATA) $(HELD) --checkpoint $(CKPT) --resolution 1 -o $(OUT)/t850_recon_1deg.nc --overwrite
	$(BIN)/mscn encode $(DATA) $(HELD) --checkpoint $(CKPT) --bits 6 -o $(OUT)/t850.mscn --overwrite
	$(BIN)/mscn decode $(OUT)/t850.mscn --checkpoint $(CKPT) -o $(OUT)/t850_decoded.nc --overwrite
	$(BIN)/mscn view globe $(DATA) $(OUT)/t850_decoded.nc $(HELD) --index 0 -o $(OUT)/t850_globe.png --overwrite
	$(BIN)/mscn view globe $(DATA) $(OUT)/t850_recon_1deg.nc $(HELD) --index 0 -o $(OUT)/t850_globe_1deg.png --overwrite
	# no --checkpoint: the general climate checkpoint, on held-out files of other variables and grids
	$(BIN)/mscn fit $(GAUSS) -o $(OUT)/u300_recon.nc --overwrite
	$(BIN)/mscn view globe $(GAUSS) $(OUT)/u300_recon.nc -o $(OUT)/u300_globe.png --overwrite
	# the ocean grid stays in the input file (--grid-storage reference): 1.5 KB, not 108 KB
	$(BIN)/mscn encode $(CURVI) --grid-storage reference -o $(OUT)/tos.mscn --overwrite
	$(BIN)/mscn decode $(OUT)/tos.mscn --grid-file $(CURVI) -o $(OUT)/tos_decoded.nc --overwrite
	$(BIN)/mscn view globe $(CURVI) $(OUT)/tos_decoded.nc -o $(OUT)/tos_globe.png --overwrite
	# the sdf checkpoint refines 300 steps after its 3 meta-learned ones (its codec's default)
	$(BIN)/mscn fit $(MESH) --checkpoint $(SDF) -o $(OUT)/bunny_sdf.obj --overwrite
	$(BIN)/mscn encode $(MESH) --modality sdf --checkpoint $(SDF) -o $(OUT)/bunny.mscn --overwrite
	$(BIN)/mscn decode $(OUT)/bunny.mscn --checkpoint $(SDF) -o $(OUT)/bunny_decoded.glb --overwrite
	$(BIN)/mscn view mesh $(MESH) $(OUT)/bunny_decoded.glb -o $(OUT)/bunny_sdf.png --overwrite
	$(BIN)/mscn fit $(MESH) --modality voxel --checkpoint $(VOX) --refine-steps 300 --points-per-step 16384 -o $(OUT)/bunny_voxels.binvox --overwrite
	$(BIN)/mscn view voxels $(MESH) $(OUT)/bunny_voxels.binvox -o $(OUT)/bunny_voxels.png --overwrite
	$(BIN)/mscn fit $(SCENE) --checkpoint $(NERF) --orbit-views 24 -o $(OUT)/jeep1_views --overwrite
	$(BIN)/mscn view $(SCENE) $(OUT)/jeep1_views -o $(OUT)/jeep1_views.png --gif $(OUT)/jeep1_orbit.gif --overwrite
	$(BIN)/mscn encode $(SCENE) --checkpoint $(NERF) --bits 6 -o $(OUT)/jeep1.mscn --overwrite
	$(BIN)/mscn decode $(OUT)/jeep1.mscn --checkpoint $(NERF) --orbit-views 0 -o $(OUT)/jeep1_decoded --overwrite
	@echo "demo outputs in $(OUT)/"

# Rebuilds the shipped checkpoint from the vendored data (about 10 minutes on 2 cores).
checkpoint: $(STAMP)
	$(BIN)/python plugins/checkpoints/build_era5_t850.py

# Rebuilds the default general climate checkpoint (any variable, level, date; per-field
# scaling; a degree-7 spherical-harmonic base + 192 modulations) from
# datasets/data/climate_general (about 20 minutes on one thread). The plain 256-modulation
# one: python plugins/checkpoints/build_climate_general.py --sh-degree -1 (checkpoints README).
climate-checkpoint: $(STAMP)
	$(BIN)/python plugins/checkpoints/build_climate_general.py --budget 192 --sh-degree 7

# Rebuilds the shipped SDF and voxel checkpoints from the vendored meshes (CPU).
shape-checkpoints: $(STAMP)
	$(BIN)/python plugins/checkpoints/build_shapes.py

# Renders the training scenes from the vendored meshes and meta-trains the shipped NeRF
# checkpoint (about 20 minutes on one CPU thread).
nerf-checkpoint: $(STAMP)
	$(BIN)/python plugins/checkpoints/build_nerf.py

clean:
	rm -rf out .pytest_cache .ruff_cache
