// Serialisation of CompiledPotentialForce: the package is referenced by path and SHA-256, never
// embedded, so reading a System's XML runs no code. Deserialising refuses a package whose bytes no
// longer match the recorded hash (and the Context checks again when it is created).
#include "flowforce/CompiledPotentialForce.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/SerializationNode.h"
#include "openmm/serialization/SerializationProxy.h"

using namespace FlowForcePlugin;
using OpenMM::OpenMMException;
using OpenMM::SerializationNode;

namespace {

constexpr int VERSION = 1;

class CompiledPotentialForceProxy : public OpenMM::SerializationProxy {
public:
    CompiledPotentialForceProxy() : SerializationProxy("CompiledPotentialForce") {}

    void serialize(const void* object, SerializationNode& node) const override {
        node.setIntProperty("version", VERSION);
        const auto& force = *reinterpret_cast<const CompiledPotentialForce*>(object);
        node.setStringProperty("package", force.getPackagePath());
        node.setStringProperty("sha256", force.getPackageSha256());
        node.setIntProperty("numModelParticles", force.getNumModelParticles());
        node.setStringProperty("dtype", force.getDtype());
        node.setStringProperty("device", force.getDevice());
        node.setIntProperty("forceGroup", force.getForceGroup());
        node.setStringProperty("name", force.getName());
        SerializationNode& particles = node.createChildNode("Particles");
        for (int p : force.getParticles())
            particles.createChildNode("Particle").setIntProperty("index", p);
    }

    void* deserialize(const SerializationNode& node) const override {
        const int version = node.getIntProperty("version");
        if (version != VERSION)
            throw OpenMMException("CompiledPotentialForce: unsupported XML version " + std::to_string(version) +
                                  " (this plugin reads version " + std::to_string(VERSION) + ")");
        const std::string path = node.getStringProperty("package");
        const std::string expected = node.getStringProperty("sha256");
        const std::string actual = sha256OfFile(path);
        if (actual != expected)
            throw OpenMMException("CompiledPotentialForce: the package '" + path + "' does not match the SHA-256 "
                                  "recorded in the XML (" + actual + " != " + expected + "); refusing to load it");
        auto* force = new CompiledPotentialForce(path, expected, node.getIntProperty("numModelParticles"),
                                                 node.getStringProperty("dtype", "float32"),
                                                 node.getStringProperty("device", "cpu"));
        try {
            force->setForceGroup(node.getIntProperty("forceGroup", 0));
            force->setName(node.getStringProperty("name", force->getName()));
            std::vector<int> particles;
            for (const SerializationNode& child : node.getChildNode("Particles").getChildren())
                particles.push_back(child.getIntProperty("index"));
            force->setParticles(particles);
        } catch (...) {
            delete force;
            throw;
        }
        return force;
    }
};

} // namespace

extern "C" FLOWFORCE_EXPORT void registerFlowForceSerializationProxies() {
    OpenMM::SerializationProxy::registerProxy(typeid(CompiledPotentialForce), new CompiledPotentialForceProxy());
}

// Loading the library (ctypes, or OpenMM's plugin loader) registers the proxy.
__attribute__((constructor)) static void registerOnLoad() {
    registerFlowForceSerializationProxies();
}

// OpenMM's plugin loader (Platform::loadPluginLibrary) looks for these two entry points. The force
// needs no kernels of its own (CustomCPPForceImpl uses the kernel every platform has).
extern "C" FLOWFORCE_EXPORT void registerPlatforms() {}
extern "C" FLOWFORCE_EXPORT void registerKernelFactories() {}
