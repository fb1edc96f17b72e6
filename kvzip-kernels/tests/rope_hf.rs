//! `RopeParams::inv_freq` / `attention_factor` against numbers produced by HF transformers' own
//! rope init functions (transformers 5.x, torch CPU). The constants were generated once with:
//!
//! ```python
//! from transformers import LlamaConfig
//! from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
//! from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
//! def cfg(head_dim, theta, rp, max_pos=2048):
//!     rp = dict(rp, rope_theta=theta)
//!     return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
//!                        max_position_embeddings=max_pos, rope_parameters=rp)
//! # default:  LlamaRotaryEmbedding.compute_default_rope_parameters(cfg(...))
//! # others:   ROPE_INIT_FUNCTIONS[rope_type](cfg(...), "cpu", seq_len=seq_len)
//! # then print inv.tolist() and the attention factor, for each case below.
//! ```
//!
//! The `LONGROPE_*` constants (factor lists fed in, and HF's frequencies at model init /
//! `seq_len = original` (equal, asserted), i.e. SHORT, and at `seq_len = original + 1`, i.e.
//! LONG) were printed by this script under transformers 5.24.0 / torch 2.15.0, output pasted
//! verbatim:
//!
//! ```python
//! import math, torch
//! from transformers import LlamaConfig, Phi3Config
//! from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
//! f = ROPE_INIT_FUNCTIONS["longrope"]
//!
//! def phi3(hidden, heads, theta, orig, max_pos, prf, short, long, **extra):
//!     rp = dict(rope_type="longrope", rope_theta=theta, partial_rotary_factor=prf,
//!               short_factor=short, long_factor=long, **extra)
//!     return Phi3Config(hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=max_pos,
//!                       original_max_position_embeddings=orig, rope_parameters=rp, pad_token_id=None)
//!
//! def llama(head_dim, theta, orig, max_pos, prf, short, long, **extra):
//!     rp = dict(rope_type="longrope", rope_theta=theta, partial_rotary_factor=prf,
//!               original_max_position_embeddings=orig, short_factor=short, long_factor=long, **extra)
//!     return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
//!                        max_position_embeddings=max_pos, rope_parameters=rp)
//!
//! def emit(name, cfg, orig):
//!     for suffix in ("short_factor", "long_factor"):
//!         vals = cfg.rope_parameters[suffix]
//!         print(f"const {name}_{suffix.upper()}: [f64; {len(vals)}] = [{', '.join(repr(float(v)) for v in vals)}];")
//!     short, att_s = f(cfg, "cpu")                      # seq_len=None (model init)
//!     at_orig, _ = f(cfg, "cpu", seq_len=orig)           # seq_len == original: still short
//!     long, att_l = f(cfg, "cpu", seq_len=orig + 1)      # what longrope_frequency_update uses
//!     assert torch.equal(short, at_orig) and att_s == att_l
//!     for suffix, t in (("SHORT", short), ("LONG", long)):
//!         print(f"const {name}_{suffix}: [f32; {t.numel()}] = [")
//!         for x in t.tolist():
//!             print(f"    {x!r},")
//!         print("];")
//!     print(f"const {name}_ATT: f64 = {att_s!r};")
//!
//! # Phi-3-mini-128k-like shape: head_dim 96, theta 1e4, original 4096, max 131072 (factor 32).
//! n = 48
//! s1 = [round(1.0 + 0.02 * i + 0.001 * i * i, 4) for i in range(n)]
//! l1 = [round(1.0 + 0.12 * i ** 1.5, 4) for i in range(n)]
//! emit("LONGROPE_PHI3_96", phi3(3072, 32, 10000.0, 4096, 131072, 1.0, s1, l1), 4096)
//! # The parity fixture's rope: head_dim 32, partial 0.75 (12 factors), original 64, max 1024.
//! s2 = [round(1.0 + 0.05 * i + 0.002 * i * i, 4) for i in range(12)]
//! l2 = [round(1.3 ** i + 0.1 * i, 4) for i in range(12)]
//! emit("LONGROPE_FIXTURE_32", phi3(128, 4, 10000.0, 64, 1024, 0.75, s2, l2), 64)
//! # Non-Phi spelling: factor and original in rope_parameters, partial 0.5 of head_dim 64, theta 5e5.
//! s3 = [round(0.9 + 0.07 * i, 4) for i in range(16)]
//! l3 = [round(2.0 + 0.5 * i * i, 4) for i in range(16)]
//! emit("LONGROPE_FACTOR8_64", llama(64, 500000.0, 2048, 4096, 0.5, s3, l3, factor=8.0), 2048)
//! # Explicit attention_factor overrides the formula.
//! _, att = f(phi3(128, 4, 10000.0, 64, 1024, 0.75, s2, l2, attention_factor=1.25), "cpu")
//! print(f"const LONGROPE_EXPLICIT_ATT: f64 = {att!r};")
//! ```
#![allow(clippy::excessive_precision, clippy::unreadable_literal)]

use kvzip_kernels::rope::{RopeParams, RopeScaling};

const DEFAULT_64_1E4: [f32; 32] = [
    1.0,
    0.7498942017555237,
    0.5623413324356079,
    0.4216965138912201,
    0.3162277638912201,
    0.23713736236095428,
    0.17782793939113617,
    0.1333521455526352,
    0.10000000149011612,
    0.07498941570520401,
    0.05623412877321243,
    0.04216964915394783,
    0.03162277862429619,
    0.0237137358635664,
    0.017782794311642647,
    0.01333521492779255,
    0.009999999776482582,
    0.007498942315578461,
    0.005623413249850273,
    0.0042169648222625256,
    0.003162277862429619,
    0.0023713738191872835,
    0.0017782794311642647,
    0.0013335214462131262,
    0.0010000000474974513,
    0.0007498941849917173,
    0.000562341301701963,
    0.00042169648804701865,
    0.0003162277862429619,
    0.0002371373848291114,
    0.00017782794020604342,
    0.0001333521504420787,
];
const DEFAULT_64_1E4_ATT: f64 = 1.0;
const DEFAULT_128_5E5: [f32; 64] = [
    1.0,
    0.8146172165870667,
    0.663601279258728,
    0.5405809879302979,
    0.44036662578582764,
    0.3587302267551422,
    0.2922278344631195,
    0.2380538135766983,
    0.193922758102417,
    0.1579728126525879,
    0.12868738174438477,
    0.10483095049858093,
    0.08539710193872452,
    0.06956595182418823,
    0.05666961893439293,
    0.046164050698280334,
    0.03760603070259094,
    0.030634520575404167,
    0.02495540864765644,
    0.020329104736447334,
    0.016560440883040428,
    0.013490419834852219,
    0.010989529080688953,
    0.008952259086072445,
    0.00729266507551074,
    0.005940730683505535,
    0.00483942124992609,
    0.003942275885492563,
    0.0032114461064338684,
    0.0026160990819334984,
    0.002131119603291154,
    0.0017360467463731766,
    0.001414213445968926,
    0.001152042648755014,
    0.0009384738514199853,
    0.0007644969737157226,
    0.0006227724370546639,
    0.0005073211505077779,
    0.0004132725589442998,
    0.00033665893715806305,
    0.00027424818836152554,
    0.00022340727446135134,
    0.00018199143232777715,
    0.00014825335529167205,
    0.00012076974235242233,
    9.838111145654693e-05,
    8.014294871827587e-05,
    6.528582161990926e-05,
    5.3182957344688475e-05,
    4.332375465310179e-05,
    3.529227615217678e-05,
    2.8749695047736168e-05,
    2.3419997887685895e-05,
    1.907833393488545e-05,
    1.5541540051344782e-05,
    1.2660406355280429e-05,
    1.0313385246263351e-05,
    8.401460945606232e-06,
    6.843975370429689e-06,
    5.575220257014735e-06,
    4.541670477919979e-06,
    3.6997230381530244e-06,
    3.01385807688348e-06,
    2.4551407022954663e-06,
];
const DEFAULT_128_5E5_ATT: f64 = 1.0;
const LINEAR_32_1E4_F8: [f32; 16] = [
    0.125,
    0.07029266655445099,
    0.03952847048640251,
    0.02222849242389202,
    0.012500000186264515,
    0.007029266096651554,
    0.0039528473280370235,
    0.002222849288955331,
    0.0012499999720603228,
    0.0007029266562312841,
    0.00039528473280370235,
    0.00022228492889553308,
    0.0001250000059371814,
    7.029266271274537e-05,
    3.9528473280370235e-05,
    2.2228492525755428e-05,
];
const LINEAR_32_1E4_F8_ATT: f64 = 1.0;
const LLAMA3_64_5E5: [f32; 32] = [
    1.0,
    0.663601279258728,
    0.44036662578582764,
    0.2922278344631195,
    0.193922758102417,
    0.12868738174438477,
    0.08539710193872452,
    0.05666961893439293,
    0.03760603070259094,
    0.02495540864765644,
    0.016560440883040428,
    0.010989529080688953,
    0.00729266507551074,
    0.00483942124992609,
    0.0032114461064338684,
    0.0013718936825171113,
    0.0005248460220173001,
    0.0001785077911335975,
    7.784655463183299e-05,
    5.165906986803748e-05,
    3.428102354519069e-05,
    2.2748929040972143e-05,
    1.5096217794052791e-05,
    1.0017868589784484e-05,
    6.647869668086059e-06,
    4.411534519022098e-06,
    2.927499735960737e-06,
    1.9426925064180978e-06,
    1.289173155782919e-06,
    8.554969213037111e-07,
    5.677088097399974e-07,
    3.76732259610435e-07,
];
const LLAMA3_64_5E5_ATT: f64 = 1.0;
const LLAMA3_128_5E5_F32: [f32; 64] = [
    1.0,
    0.8146172165870667,
    0.663601279258728,
    0.5405809879302979,
    0.44036662578582764,
    0.3587302267551422,
    0.2922278344631195,
    0.2380538135766983,
    0.193922758102417,
    0.1579728126525879,
    0.12868738174438477,
    0.10483095049858093,
    0.08539710193872452,
    0.06956595182418823,
    0.05666961893439293,
    0.046164050698280334,
    0.03760603070259094,
    0.030634520575404167,
    0.02495540864765644,
    0.020329104736447334,
    0.016560440883040428,
    0.013490419834852219,
    0.010989529080688953,
    0.008952259086072445,
    0.00729266507551074,
    0.005940730683505535,
    0.00483942124992609,
    0.003942275885492563,
    0.0032114461064338684,
    0.002118406817317009,
    0.0012905480107292533,
    0.000762541254516691,
    0.000429556705057621,
    0.00022276341042015702,
    9.708286233944818e-05,
    2.389053042861633e-05,
    1.9461638657958247e-05,
    1.585378595336806e-05,
    1.291476746700937e-05,
    1.052059178618947e-05,
    8.570255886297673e-06,
    6.981477326917229e-06,
    5.687232260243036e-06,
    4.632917352864752e-06,
    3.7740544485131977e-06,
    3.0744097330170916e-06,
    2.504467147446121e-06,
    2.0401819256221643e-06,
    1.6619674170215148e-06,
    1.3538673329094308e-06,
    1.1028836297555245e-06,
    8.984279702417552e-07,
    7.318749339901842e-07,
    5.961979354651703e-07,
    4.856731266045244e-07,
    3.956376986025134e-07,
    3.2229328894572973e-07,
    2.6254565455019474e-07,
    2.1387423032592778e-07,
    1.7422563303171046e-07,
    1.4192720243499934e-07,
    1.1561634494228201e-07,
    9.418306490260875e-08,
    7.672314694673332e-08,
];
const LLAMA3_128_5E5_F32_ATT: f64 = 1.0;
const YARN_64_1E6_F4: [f32; 32] = [
    1.0,
    0.6493816375732422,
    0.4216965138912201,
    0.2738419771194458,
    0.17782793939113617,
    0.11547820270061493,
    0.07498941570520401,
    0.04869675263762474,
    0.03162277862429619,
    0.02053525112569332,
    0.01333521492779255,
    0.00865964312106371,
    0.005154795479029417,
    0.0030431177001446486,
    0.0017785303061828017,
    0.001026617712341249,
    0.0005833333707414567,
    0.00032469083089381456,
    0.0001757068675942719,
    9.128064994001761e-05,
    4.4456985051510856e-05,
    2.8869548259535804e-05,
    1.8747356079984456e-05,
    1.2174188668723218e-05,
    7.905693564680405e-06,
    5.133812464919174e-06,
    3.3338035336782923e-06,
    2.1649109385180054e-06,
    1.405853367941745e-06,
    9.129353202297352e-07,
    5.928434347879374e-07,
    3.8498163235090033e-07,
];
const YARN_64_1E6_F4_ATT: f64 = 1.138629436111989;
const YARN_32_1E4_MSCALE: [f32; 16] = [
    1.0,
    0.5623413324356079,
    0.3162277638912201,
    0.17782793939113617,
    0.10000000149011612,
    0.05623412877321243,
    0.027218176051974297,
    0.012829016894102097,
    0.005821428261697292,
    0.0024903686717152596,
    0.0009599771583452821,
    0.00029214590904302895,
    2.499999936844688e-05,
    1.4058532542549074e-05,
    7.905694474175107e-06,
    4.445698323252145e-06,
];
const YARN_32_1E4_MSCALE_ATT: f64 = 1.0857263992561355;
const YARN_32_1E4_NOTRUNC: [f32; 16] = [
    1.0,
    0.5623413324356079,
    0.3162277638912201,
    0.17782793939113617,
    0.10000000149011612,
    0.047757819294929504,
    0.021932050585746765,
    0.009564242325723171,
    0.003821214661002159,
    0.0012731747701764107,
    0.00022354358225129545,
    0.00011114246444776654,
    6.25000029685907e-05,
    3.5146331356372684e-05,
    1.9764236640185118e-05,
    1.1114246262877714e-05,
];
const YARN_32_1E4_NOTRUNC_ATT: f64 = 1.25;
const DYNAMIC_64_1E4_F2: [f32; 32] = [
    1.0,
    0.7177864909172058,
    0.5152174234390259,
    0.3698161244392395,
    0.26544901728630066,
    0.19053570926189423,
    0.13676396012306213,
    0.09816732257604599,
    0.07046318054199219,
    0.050577517598867416,
    0.03630385547876358,
    0.026058416813611984,
    0.018704380840063095,
    0.013425751589238644,
    0.00963682308793068,
    0.006917180959135294,
    0.004965058993548155,
    0.003563852282240987,
    0.002558085136115551,
    0.001836158917285502,
    0.0013179699890315533,
    0.0009460209985263646,
    0.0006790411425754428,
    0.0004874065634794533,
    0.00034985385718755424,
    0.0002511203638277948,
    0.00018025079043582082,
    0.00012938158761244267,
    9.28683512029238e-05,
    6.665964610874653e-05,
    4.784739576280117e-05,
    3.4344215237069875e-05,
];
const DYNAMIC_64_1E4_F2_ATT: f64 = 1.0;

const LONGROPE_PHI3_96_SHORT_FACTOR: [f64; 48] = [
    1.0, 1.021, 1.044, 1.069, 1.096, 1.125, 1.156, 1.189, 1.224, 1.261, 1.3, 1.341, 1.384, 1.429,
    1.476, 1.525, 1.576, 1.629, 1.684, 1.741, 1.8, 1.861, 1.924, 1.989, 2.056, 2.125, 2.196, 2.269,
    2.344, 2.421, 2.5, 2.581, 2.664, 2.749, 2.836, 2.925, 3.016, 3.109, 3.204, 3.301, 3.4, 3.501,
    3.604, 3.709, 3.816, 3.925, 4.036, 4.149,
];
const LONGROPE_PHI3_96_LONG_FACTOR: [f64; 48] = [
    1.0, 1.12, 1.3394, 1.6235, 1.96, 2.3416, 2.7636, 3.2224, 3.7153, 4.24, 4.7947, 5.3779, 5.9883,
    6.6247, 7.286, 7.9714, 8.68, 9.4111, 10.1641, 10.9383, 11.7331, 12.5481, 13.3827, 14.2365,
    15.1091, 16.0, 16.9089, 17.8355, 18.7794, 19.7404, 20.718, 21.7121, 22.7223, 23.7485, 24.7903,
    25.8475, 26.92, 28.0075, 29.1097, 30.2266, 31.3579, 32.5034, 33.6629, 34.8364, 36.0236,
    37.2243, 38.4385, 39.6659,
];
const LONGROPE_PHI3_96_SHORT: [f32; 48] = [
    1.0,
    0.8084271550178528,
    0.652578592300415,
    0.5260442495346069,
    0.4235026240348816,
    0.34054994583129883,
    0.27355343103408813,
    0.21952541172504425,
    0.17601589858531952,
    0.14102137088775635,
    0.11290764063596725,
    0.09034508466720581,
    0.07225433737039566,
    0.05776096135377884,
    0.04615800455212593,
    0.03687484189867973,
    0.029451701790094376,
    0.023518646135926247,
    0.018778370693325996,
    0.014992286451160908,
    0.011969083920121193,
    0.009555505588650703,
    0.007628893945366144,
    0.006091139744967222,
    0.004863813053816557,
    0.003884255653247237,
    0.0031024222262203693,
    0.0024783662520349026,
    0.0019802001770585775,
    0.0015824808506295085,
    0.0012649111449718475,
    0.001011296990327537,
    0.0008087215828709304,
    0.0006468822830356658,
    0.000517559761647135,
    0.0004141974204685539,
    0.0003315649810247123,
    0.00026548869209364057,
    0.00021263794042170048,
    0.00017035483324434608,
    0.00013651733752340078,
    0.00010943119559669867,
    8.774355228524655e-05,
    7.037362229311839e-05,
    5.645792043651454e-05,
    4.530648220679723e-05,
    3.636768087744713e-05,
    2.9200467906775884e-05,
];
const LONGROPE_PHI3_96_LONG: [f32; 48] = [
    1.0,
    0.7369679808616638,
    0.5086546540260315,
    0.3463759422302246,
    0.23681575059890747,
    0.16361406445503235,
    0.11442601680755615,
    0.08100041002035141,
    0.05798817425966263,
    0.041940558701753616,
    0.030612951144576073,
    0.022527892142534256,
    0.016699230298399925,
    0.012459494173526764,
    0.009350702166557312,
    0.007054486311972141,
    0.005347451660782099,
    0.004070923663675785,
    0.0031112225260585546,
    0.0023862547241151333,
    0.0018362026894465089,
    0.0014171702787280083,
    0.0010967885609716177,
    0.0008510011248290539,
    0.0006618527695536613,
    0.0005158777348697186,
    0.00040291916229762137,
    0.00031529326224699616,
    0.00024716390180401504,
    0.0001940784277394414,
    0.0001526343112345785,
    0.00012021673319395632,
    9.48158631217666e-05,
    7.487965194741264e-05,
    5.920862531638704e-05,
    4.687213368015364e-05,
    3.71471032849513e-05,
    2.947083157778252e-05,
    2.340429273317568e-05,
    1.8604185243020765e-05,
    1.4801978068135213e-05,
    1.1787032235588413e-05,
    9.393955224368256e-06,
    7.492616987292422e-06,
    5.980618880130351e-06,
    4.777200501848711e-06,
    3.818566256086342e-06,
    3.054329908991349e-06,
];
const LONGROPE_PHI3_96_ATT: f64 = 1.1902380714238083;
const LONGROPE_FIXTURE_32_SHORT_FACTOR: [f64; 12] = [
    1.0, 1.052, 1.108, 1.168, 1.232, 1.3, 1.372, 1.448, 1.528, 1.612, 1.7, 1.792,
];
const LONGROPE_FIXTURE_32_LONG_FACTOR: [f64; 12] = [
    1.0, 1.4, 1.89, 2.497, 3.2561, 4.2129, 5.4268, 6.9749, 8.9573, 11.5045, 14.7858, 19.0216,
];
const LONGROPE_FIXTURE_32_SHORT: [f32; 12] = [
    1.0,
    0.4412156343460083,
    0.19444353878498077,
    0.08561643958091736,
    0.03767522796988487,
    0.016572576016187668,
    0.007288630120456219,
    0.00320551753975451,
    0.0014099699910730124,
    0.000620347389485687,
    0.00027303467504680157,
    0.00012022511509712785,
];
const LONGROPE_FIXTURE_32_LONG: [f32; 12] = [
    1.0,
    0.33154207468032837,
    0.11399125307798386,
    0.040048059076070786,
    0.014255054295063019,
    0.0051138997077941895,
    0.001842706580646336,
    0.0006654704338870943,
    0.00024052272783592343,
    8.692251140018925e-05,
    3.139221007586457e-05,
    1.1326251296850387e-05,
];
const LONGROPE_FIXTURE_32_ATT: f64 = 1.2909944487358056;
const LONGROPE_FACTOR8_64_SHORT_FACTOR: [f64; 16] = [
    0.9, 0.97, 1.04, 1.11, 1.18, 1.25, 1.32, 1.39, 1.46, 1.53, 1.6, 1.67, 1.74, 1.81, 1.88, 1.95,
];
const LONGROPE_FACTOR8_64_LONG_FACTOR: [f64; 16] = [
    2.0, 2.5, 4.0, 6.5, 10.0, 14.5, 20.0, 26.5, 34.0, 42.5, 52.0, 62.5, 74.0, 86.5, 100.0, 114.5,
];
const LONGROPE_FACTOR8_64_SHORT: [f32; 16] = [
    1.1111111640930176,
    0.45398619771003723,
    0.18646419048309326,
    0.0769343227148056,
    0.031869519501924515,
    0.013248352333903313,
    0.005524745676666498,
    0.002310392912477255,
    0.0009686393314041197,
    0.00040704081766307354,
    0.00017140510317403823,
    7.231721247080714e-05,
    3.0564919143216684e-05,
    1.2939226508024149e-05,
    5.485842848429456e-06,
    2.3290617718885187e-06,
];
const LONGROPE_FACTOR8_64_LONG: [f32; 16] = [
    0.5,
    0.17614665627479553,
    0.04848068952560425,
    0.013138016685843468,
    0.0037606030236929655,
    0.0011420993832871318,
    0.0003646332479547709,
    0.00012118664744775742,
    4.159451782470569e-05,
    1.4653468497272115e-05,
    5.274003342492506e-06,
    1.932315853991895e-06,
    7.186886250565294e-07,
    2.7075142838839383e-07,
    1.031338427992523e-07,
    3.9665245310516184e-08,
];
const LONGROPE_FACTOR8_64_ATT: f64 = 1.1281521496355325;
const LONGROPE_EXPLICIT_ATT: f64 = 1.25;

/// Asserts agreement to within one f32 ulp (HF's f32 pow may differ from a correctly rounded one).
fn assert_ulp_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let rel = ((g - w) / w).abs();
        assert!(
            rel <= 1.2e-7,
            "{name}[{i}]: got {g:e}, HF {w:e}, rel {rel:e}"
        );
    }
}

fn params(theta: f64, rotary_dim: usize, scaling: RopeScaling, max_pos: usize) -> RopeParams {
    let p = RopeParams {
        theta,
        rotary_dim,
        scaling,
        max_position_embeddings: max_pos,
    };
    p.validate().unwrap();
    p
}

fn check(name: &str, p: &RopeParams, want: &[f32], att: f64) {
    assert_ulp_close(name, &p.inv_freq(), want);
    assert!(
        (p.attention_factor() as f64 - att).abs() < 1e-7,
        "{name}: attention factor {} vs {att}",
        p.attention_factor()
    );
}

#[test]
fn default_matches_hf() {
    check(
        "default_64",
        &params(10000.0, 64, RopeScaling::Default, 2048),
        &DEFAULT_64_1E4,
        DEFAULT_64_1E4_ATT,
    );
    check(
        "default_128",
        &params(500000.0, 128, RopeScaling::Default, 2048),
        &DEFAULT_128_5E5,
        DEFAULT_128_5E5_ATT,
    );
}

#[test]
fn linear_matches_hf() {
    let p = params(10000.0, 32, RopeScaling::Linear { factor: 8.0 }, 2048);
    check("linear", &p, &LINEAR_32_1E4_F8, LINEAR_32_1E4_F8_ATT);
}

#[test]
fn llama3_matches_hf() {
    for (factor, dim, want, att) in [
        (8.0, 64, &LLAMA3_64_5E5[..], LLAMA3_64_5E5_ATT),
        (32.0, 128, &LLAMA3_128_5E5_F32[..], LLAMA3_128_5E5_F32_ATT),
    ] {
        let scaling = RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        check(
            &format!("llama3 f={factor}"),
            &params(500000.0, dim, scaling, 131072),
            want,
            att,
        );
    }
}

#[test]
fn yarn_matches_hf() {
    let yarn =
        |factor, original, mscale, mscale_all_dim, attention_factor, truncate| RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate,
        };
    let p = params(1e6, 64, yarn(4.0, 32768, None, None, None, true), 131072);
    check("yarn qwen-like", &p, &YARN_64_1E6_F4, YARN_64_1E6_F4_ATT);
    let p = params(
        10000.0,
        32,
        yarn(40.0, 4096, Some(1.0), Some(0.707), None, true),
        163840,
    );
    check(
        "yarn mscale",
        &p,
        &YARN_32_1E4_MSCALE,
        YARN_32_1E4_MSCALE_ATT,
    );
    let p = params(
        10000.0,
        32,
        yarn(16.0, 2048, None, None, Some(1.25), false),
        32768,
    );
    check(
        "yarn no truncate",
        &p,
        &YARN_32_1E4_NOTRUNC,
        YARN_32_1E4_NOTRUNC_ATT,
    );
}

#[test]
fn dynamic_matches_hf_past_max_positions() {
    let p = params(10000.0, 64, RopeScaling::Dynamic { factor: 2.0 }, 2048);
    assert_ulp_close(
        "dynamic seq 5000",
        &p.inv_freq_for_seq_len(5000),
        &DYNAMIC_64_1E4_F2,
    );
    assert_eq!(p.attention_factor() as f64, DYNAMIC_64_1E4_F2_ATT);
    // Within max_position_embeddings dynamic equals default.
    let d = params(10000.0, 64, RopeScaling::Default, 2048);
    assert_eq!(p.inv_freq(), d.inv_freq());
}

#[test]
fn invalid_params_are_rejected() {
    let bad = [
        RopeParams {
            theta: 10000.0,
            rotary_dim: 63,
            scaling: RopeScaling::Default,
            max_position_embeddings: 1,
        },
        RopeParams {
            theta: -1.0,
            rotary_dim: 64,
            scaling: RopeScaling::Default,
            max_position_embeddings: 1,
        },
        RopeParams {
            theta: 1e4,
            rotary_dim: 64,
            scaling: RopeScaling::Linear { factor: 0.0 },
            max_position_embeddings: 1,
        },
    ];
    for p in bad {
        assert!(p.validate().is_err(), "{p:?}");
    }
}

#[allow(clippy::too_many_arguments)]
fn longrope(
    theta: f64,
    rotary_dim: usize,
    max_pos: usize,
    original: usize,
    short: &[f64],
    long: &[f64],
    factor: Option<f64>,
    attention_factor: Option<f64>,
) -> RopeParams {
    params(
        theta,
        rotary_dim,
        RopeScaling::LongRope {
            short_factor: short.to_vec(),
            long_factor: long.to_vec(),
            original_max_position_embeddings: original,
            factor,
            attention_factor,
        },
        max_pos,
    )
}

#[test]
fn longrope_matches_hf_short_and_long() {
    let cases = [
        // Phi-3-mini-128k shape: head_dim 96, original 4096, max 131072 -> factor 32 (no `factor` key).
        (
            "phi3 96",
            longrope(
                1e4,
                96,
                131072,
                4096,
                &LONGROPE_PHI3_96_SHORT_FACTOR,
                &LONGROPE_PHI3_96_LONG_FACTOR,
                None,
                None,
            ),
            4096,
            &LONGROPE_PHI3_96_SHORT[..],
            &LONGROPE_PHI3_96_LONG[..],
            LONGROPE_PHI3_96_ATT,
        ),
        // The parity fixture's rope: partial_rotary_factor 0.75 of head_dim 32 (12 factors).
        (
            "fixture 32",
            longrope(
                1e4,
                24,
                1024,
                64,
                &LONGROPE_FIXTURE_32_SHORT_FACTOR,
                &LONGROPE_FIXTURE_32_LONG_FACTOR,
                None,
                None,
            ),
            64,
            &LONGROPE_FIXTURE_32_SHORT[..],
            &LONGROPE_FIXTURE_32_LONG[..],
            LONGROPE_FIXTURE_32_ATT,
        ),
        // `factor` given explicitly (8, not max / original = 2); partial 0.5 of head_dim 64.
        (
            "factor 8",
            longrope(
                5e5,
                32,
                4096,
                2048,
                &LONGROPE_FACTOR8_64_SHORT_FACTOR,
                &LONGROPE_FACTOR8_64_LONG_FACTOR,
                Some(8.0),
                None,
            ),
            2048,
            &LONGROPE_FACTOR8_64_SHORT[..],
            &LONGROPE_FACTOR8_64_LONG[..],
            LONGROPE_FACTOR8_64_ATT,
        ),
    ];
    for (name, p, original, short, long, att) in cases {
        assert!(p.depends_on_seq_len(), "{name}");
        // Model init (HF seq_len=None) and every seq_len up to `original`: short factors.
        check(&format!("{name} init"), &p, short, att);
        for seq_len in [1, original / 2, original] {
            assert_ulp_close(
                &format!("{name} seq_len {seq_len}"),
                &p.inv_freq_for_seq_len(seq_len),
                short,
            );
        }
        // One position past `original`: long factors, and they stay long.
        for seq_len in [original + 1, 4 * original, 1 << 20] {
            assert_ulp_close(
                &format!("{name} seq_len {seq_len}"),
                &p.inv_freq_for_seq_len(seq_len),
                long,
            );
        }
    }
    let explicit = longrope(
        1e4,
        24,
        1024,
        64,
        &LONGROPE_FIXTURE_32_SHORT_FACTOR,
        &LONGROPE_FIXTURE_32_LONG_FACTOR,
        None,
        Some(1.25),
    );
    assert_eq!(explicit.attention_factor() as f64, LONGROPE_EXPLICIT_ATT);
    // factor <= 1 (max_position_embeddings == original): no attention scaling.
    let unscaled = longrope(
        1e4,
        24,
        64,
        64,
        &LONGROPE_FIXTURE_32_SHORT_FACTOR,
        &LONGROPE_FIXTURE_32_LONG_FACTOR,
        None,
        None,
    );
    assert_eq!(unscaled.attention_factor(), 1.0);
}

#[test]
fn only_dynamic_and_longrope_depend_on_seq_len() {
    assert!(!params(1e4, 64, RopeScaling::Default, 2048).depends_on_seq_len());
    assert!(!params(1e4, 32, RopeScaling::Linear { factor: 8.0 }, 2048).depends_on_seq_len());
    assert!(params(1e4, 64, RopeScaling::Dynamic { factor: 2.0 }, 2048).depends_on_seq_len());
}

#[test]
fn invalid_longrope_is_rejected() {
    let ok = vec![1.0; 8];
    let bad = |short: Vec<f64>, long: Vec<f64>, original, attention_factor| RopeParams {
        theta: 1e4,
        rotary_dim: 16,
        scaling: RopeScaling::LongRope {
            short_factor: short,
            long_factor: long,
            original_max_position_embeddings: original,
            factor: None,
            attention_factor,
        },
        max_position_embeddings: 4096,
    };
    for (p, needle) in [
        (
            bad(vec![1.0; 7], ok.clone(), 64, None),
            "short_factor has 7 values",
        ),
        (
            bad(ok.clone(), vec![1.0; 9], 64, None),
            "long_factor has 9 values",
        ),
        (
            bad(ok.clone(), vec![0.0; 8], 64, None),
            "long_factor values",
        ),
        (
            bad(ok.clone(), ok.clone(), 0, None),
            "original_max_position_embeddings",
        ),
        (
            bad(ok.clone(), ok.clone(), 64, Some(f64::NAN)),
            "attention_factor",
        ),
    ] {
        let e = p.validate().expect_err(needle).to_string();
        assert!(e.contains(needle), "{e} lacks {needle:?}");
    }
}
